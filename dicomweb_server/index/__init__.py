"""The index over PostgreSQL. Callers hold one `Index`
(database.py), whose methods come from one submodule per concern:

    database.py  Index (open, apply_schema, ping, close) made of the classes below
    pool.py      the only asyncpg importer: Pooled (the pool, the per-query timeout,
                 _fetch/_fetchrow/_execute, and the 503 an unavailable database becomes),
                 create_pool, connect, the error classes the others catch, not_up_yet
    store.py     Store: the two-phase store: the process's owner lock, blob key reservations,
                 commit_instance, blob repair, and the rewrite of `reindex`
    walk.py      Walk: the stored instances in pages and the blob keys referenced (the walks
                 of `reindex` and `check`)
    reads.py     Reads: locate, metadata texts and series versions, bulk data, search, counts
    security.py  Security: API keys and the audit trail
    rows.py      the dataclasses the methods return (StoredInstance, CommitResult, ...)
"""
