"""The shard fan-out (docs/fanout.md): ``client.GrpcLookupClient`` sends the bags of a
micro-batch as one Lookup RPC per shard node. By concern: ``routing`` (which replica gets which
partition's share, what a batch stops asking), ``replicas`` (the pure state of each node:
latency, ejection, the hedge budget), ``hedging`` (a late node's share raced on other replicas),
``calls`` (one Lookup RPC and the channels it goes over)."""
