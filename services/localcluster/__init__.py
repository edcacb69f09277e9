"""The local cluster as a library: ZooKeeper, Redis, N shard processes and a frontend on
loopback, started and stopped by ``shardrec demo`` / ``shardrec cluster up|status|down``, the
benchmarks and the tests. docs/local-cluster.md tells the bring-up and stop order, the state
file and the signal rules; each module holds one concern:

- ``config``: ``LocalClusterConfig`` and the defaults;
- ``state``: the state file ``<workdir>/cluster.json`` (``ClusterState``, ``ProcessRecord``);
- ``processes``: liveness by pid, stopping and reaping, ``SignalGuard``;
- ``servers``: ZooKeeper and Redis server processes (also the tests' servers);
- ``console``: progress lines;
- ``launcher``: ``LocalCluster``, which starts and stops one cluster;
- ``status``: ``cluster status`` and ``cluster down`` by state file;
- ``demo``: sample requests and how to call a running cluster.
"""
