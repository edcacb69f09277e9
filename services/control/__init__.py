"""The control plane as a library: what the ``shardrec`` commands do to a live cluster
(publish, roll back, rebalance, place, load features), callable by tests and benchmarks.
Each function takes its ZooKeeper store (``cluster.open_cluster``) and returns what happened;
admin parses arguments and prints. docs/placement.md and docs/checkpoint.md tell the lifecycles.
"""
