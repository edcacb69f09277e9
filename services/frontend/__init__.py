"""The Recommend frontend, one straight path per request: ``servicer`` (decode, encode) ->
``recommender`` (deadline, request id) -> ``validate`` -> ``batching`` (the micro-batcher) ->
``pipeline`` (one micro-batch): ``features`` (one MGET) -> ``lookup/`` -> ``scoring`` (the
ranker's ``Scorer``, top-k). Around it: ``view`` (the cluster, from ZooKeeper), ``versions``
(switching versions) and ``main`` (wiring)."""
