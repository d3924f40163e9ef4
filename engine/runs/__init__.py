"""Runs and processes: run folders, starting and resuming, the engine process, distributed ranks, ssh."""
