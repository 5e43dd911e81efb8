"""Map a per-shard function over shards: in process, threads, a process pool, Ray tasks."""
