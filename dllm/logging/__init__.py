"""Run records and their sinks: the locked CSV, the run directory, W&B."""
