"""Runs and processes: run folders, starting and resuming, the engine process, distributed ranks,
the blocking client, ssh. docs/ARCHITECTURE.md."""
