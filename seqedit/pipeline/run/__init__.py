"""Running campaigns: the Ray driver, its actors and pools, health steps, the sharded stats
job, job submission."""
