"""Every exit code of `tunetop`, in one place (README, "Exit codes", says the same to users).

A new command that needs a code of its own adds it here and to the README's table; the codes of
`tunetop wait` (one per way a run ends) keep clear of these.
"""

EXIT_OK = 0
"""Success."""
EXIT_FAILED = 1
"""An internal failure (the log and journal have the traceback), a dead rank, or a file a new run needs that cannot be written."""
EXIT_BAD_INPUT = 2
"""Bad input: config, data, model, arguments, an unknown or ambiguous run; the message names what and how to fix it."""
EXIT_UNREACHABLE = 3
"""The engine cannot be reached, or it refused the command (the reason is printed)."""
EXIT_DAMAGED = 4
"""`tunetop events`: the journal has damaged records; every intact one was printed."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT); the adapter was saved first."""
EXIT_TERMINATED = 143
"""SIGTERM (128 + SIGTERM); the adapter was saved first."""
