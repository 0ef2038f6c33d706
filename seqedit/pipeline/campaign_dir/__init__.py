"""A campaign directory at rest: durable state, the one-driver lock, Parquet parts and
their compaction."""
