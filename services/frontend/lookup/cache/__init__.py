"""The frontend's embedding cache (docs/cache.md): ``store.RowCache`` (rows, admission,
eviction, invalidation by version), over ``table`` (its numpy index and frequency sketch), and
``client.CachedLookupClient`` (the cache in front of any remote ``LookupClient``)."""
