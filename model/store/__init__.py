"""Where a model lives outside the process: the checkpoint file, the feedback event log (SQLite, PostgreSQL)."""
