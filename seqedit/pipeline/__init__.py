"""Campaign planning, the Ray driver, the metric store and the CLI: the only code that uses Ray."""
