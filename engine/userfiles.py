"""Files a user names (a config, a data split, a YAML recipe): what kind of thing is at the path.

Opening a named pipe for reading blocks until something writes to it, which may be never, and
reading a folder or a device fails with an OS error a user should not have to decode. So every
file a user hands tunetop is looked at with ``stat`` first and refused, with a sentence, when it
is not a regular file. No mlx import here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def not_a_regular_file(path: Path) -> str:
    """What ``path`` is when it is not a regular file ("a folder", "a named pipe (FIFO)", ...).

    "" for a regular file (a symbolic link counts as what it points to) and for a path that does
    not exist or cannot be looked at: opening it then reports that more precisely.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "" if stat.S_ISREG(mode) else "not a regular file"
