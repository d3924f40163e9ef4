"""Private state: a run's folders are 0700 and its files 0600, so other local users see nothing.

A run holds the config (paths, perhaps tokens in a model id), the journal, the engine's log,
the optimizer state and the adapters: all of it is the owner's alone. Folders are made with
mode 0700 and files opened with mode 0600 explicitly (as the sockets are), and the engine
process runs under a 077 umask so files that libraries write (mx.save_safetensors) follow.
Folders and files of runs made by older versions (0755 / 0644) are tightened when an engine
starts on them. No mlx import here.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
ENGINE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents, with the usual modes) as a 0700 folder; tighten it
    if it exists and is ours with group or other bits set.

    A folder that exists and belongs to another user is refused (PermissionError naming it): its
    owner could change what is in it at any time (a queue entry, a run's config), whatever its
    mode says now."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        owner = path.stat().st_uid
        if owner != os.getuid():
            raise PermissionError(
                errno.EACCES,
                f"it belongs to another user (uid {owner}), who could change what tunetop reads there; "
                "use a folder of your own (TUNETOP_HOME)",
                str(path),
            ) from None
        tighten(path)
    return path


def tighten(path: Path) -> None:
    """Drop group and other permission bits of ``path`` if it is ours (a no-op otherwise)."""
    try:
        info = path.stat()
        if info.st_mode & 0o077 and (info.st_uid == os.getuid() or os.getuid() == 0):
            os.chmod(path, info.st_mode & 0o700)
    except OSError:
        pass  # gone meanwhile, or not ours to change: nothing to tighten


def tighten_tree(root: Path) -> None:
    """Tighten ``root`` and everything below it (a run folder made by an older version)."""
    tighten(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            tighten(Path(folder) / name)


def open_private(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600 for a file it creates."""
    return os.open(str(path), flags, FILE_MODE)


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` by a rename, mode 0600, without fsync (for derived files).

    On a failed write (a full disk) the temp file is removed, so it holds no space, and the
    old file stays as it was.
    """
    temp = path.with_name(path.name + ".tmp")
    try:
        fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        if error.filename is None and error.errno is not None:  # os.write's errors name no file
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def raise_open_file_limit(target: int = 65536) -> None:
    """Raise this process's soft limit on open files towards ``target`` (never above the hard limit).

    Each client connection to the engine's sockets holds a file descriptor, and libzmq aborts the
    whole process when accept() meets EMFILE: at the usual soft limit of 1,024-2,048 a few thousand
    idle connections ended a run without a save. The hard limit is typically far higher.
    """
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        pass  # a platform or sandbox that refuses: keep the limit we have
