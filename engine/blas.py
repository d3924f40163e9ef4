"""Load an optimized BLAS before MLX on Linux.

The Linux ``mlx-cpu`` wheel links netlib's reference BLAS, which runs sgemm at a few GFLOP/s.
Loading OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` is imported puts its ``cblas_*``
symbols first in the global lookup scope, so MLX's matmuls run on OpenBLAS (30-50x faster
here; see docs/PERFORMANCE.md). No mlx import in this module.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

CANDIDATES = (
    # Debian / Ubuntu: libopenblas0-pthread (installed by the README's set-up command).
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    # Fedora, Arch and friends.
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
)

_loaded: str | None = None
_attempted = False


def loaded_blas() -> str | None:
    """The path of the BLAS this module loaded, or None."""
    return _loaded


def preload_optimized_blas(*, warn: bool = True) -> str | None:
    """Load OpenBLAS globally if we are on Linux and MLX is not imported yet.

    ``TUNETOP_BLAS`` names a library to load instead; ``TUNETOP_BLAS=none`` turns this off
    (benchmarks use it to measure the reference BLAS). Returns the loaded path, or None.
    """
    global _loaded, _attempted
    if _attempted:
        return _loaded
    _attempted = True
    if not sys.platform.startswith("linux"):
        return None
    choice = os.environ.get("TUNETOP_BLAS", "")
    if choice.lower() == "none":
        return None
    if "mlx.core" in sys.modules:
        if warn:
            warnings.warn(
                "tunetop: mlx was imported before engine; MLX keeps its reference BLAS "
                "(slow on Linux). Import engine first.",
                stacklevel=2,
            )
        return None
    for candidate in ([choice] if choice else []) + list(CANDIDATES):
        try:
            ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _loaded = candidate
        return candidate
    if warn:
        print(
            "tunetop: warning: no OpenBLAS found; MLX uses its reference BLAS on Linux, which is "
            "30x slower. Install it with `apt-get install libopenblas0-pthread`.",
            file=sys.stderr,
        )
    return None
