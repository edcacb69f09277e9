"""The comparison baselines' lookup steps (docs/benchmarks.md): ``redis_kv`` (rows in Redis,
pooled in the frontend; its layout and loader in ``redis_kv_store``) and ``torchrec`` (TorchRec's
EmbeddingBagCollection in the frontend process). Everything else of a baseline frontend is the
shardrec frontend's own code."""
