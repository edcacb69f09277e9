"""The control plane as a library: what the ``shardrec`` commands do to a live cluster (place,
publish, roll back, rebalance, load features), called directly by tests and benchmarks. Its
functions take the cluster's store (``cluster.open_cluster``) or a Redis URL and return what
happened; the ``shardrec`` CLI parses arguments and prints. docs/placement.md and
docs/checkpoint.md tell the lifecycles.
"""
