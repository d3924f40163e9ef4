"""What the machine is doing while a run trains: CPU, memory, MLX's memory, an NVIDIA GPU.

:class:`SystemMonitor` samples every ``metrics.system_seconds`` on a thread of its own, so a slow
read (NVML can take milliseconds) never lands inside a training step; the engine's loop takes
the newest sample between steps (:meth:`SystemMonitor.take`) and emits it as a ``system`` event.
The loop's only costs are a clock check per step and, every few seconds, one event.

What is read, and where:
- the process's CPU time from ``os.times()`` (every thread, Linux and macOS alike), as percent
  of one core over the interval (above 100 when several cores work);
- its resident memory from ``/proc/self/statm`` on Linux, Mach's ``task_info`` on macOS;
- the machine's memory from ``/proc/meminfo`` (used = total - available) on Linux, ``sysctl``
  and Mach's VM statistics (active + wired + compressed pages) on macOS;
- MLX's allocator counters (active, cache, peak): plain reads of three numbers, taken on the
  loop's thread between steps, never touching an array (so nothing waits on the device);
- the engine's NVIDIA GPU through NVML (``pip install 'tunetop[nvidia]'``, nvidia-ml-py): the
  first device ``CUDA_VISIBLE_DEVICES`` names, else device 0.

Whatever cannot be read on this machine (no NVML, no GPU, another OS) is left out of the event,
never an error. No mlx import: the counters are read only when the engine has loaded mlx.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any

# -- the process and the machine -------------------------------------------------------------


def process_rss() -> int | None:
    """The process's resident memory in bytes, or None where it cannot be read."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/statm", "rb") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    if sys.platform == "darwin":
        return _mach_rss()
    return None


def system_memory() -> tuple[int, int] | None:
    """(used, total) bytes of the machine's memory, or None where it cannot be read."""
    if sys.platform.startswith("linux"):
        return _linux_memory()
    if sys.platform == "darwin":
        return _mach_memory()
    return None


def _linux_memory() -> tuple[int, int] | None:
    values: dict[bytes, int] = {}
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(b":")
                if name in (b"MemTotal", b"MemAvailable", b"MemFree"):
                    values[name] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    total = values.get(b"MemTotal")
    available = values.get(b"MemAvailable", values.get(b"MemFree"))  # MemAvailable: Linux 3.14 on
    if not total or available is None:
        return None
    return total - available, total


def _mach_rss() -> int | None:  # pragma: no cover - macOS only
    """``task_info(MACH_TASK_BASIC_INFO).resident_size``: what Activity Monitor calls the process's memory."""
    try:
        import ctypes
        import ctypes.util

        class TimeValue(ctypes.Structure):
            _fields_ = [("seconds", ctypes.c_int), ("microseconds", ctypes.c_int)]

        class BasicInfo(ctypes.Structure):
            _pack_ = 4
            _fields_ = [
                ("virtual_size", ctypes.c_uint64),
                ("resident_size", ctypes.c_uint64),
                ("resident_size_max", ctypes.c_uint64),
                ("user_time", TimeValue),
                ("system_time", TimeValue),
                ("policy", ctypes.c_int),
                ("suspend_count", ctypes.c_int),
            ]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mach_task_self.restype = ctypes.c_uint
        info = BasicInfo()
        count = ctypes.c_uint(ctypes.sizeof(BasicInfo) // 4)  # the kernel writes no more than this
        if libc.task_info(libc.mach_task_self(), 20, ctypes.byref(info), ctypes.byref(count)) != 0:  # 20: MACH_TASK_BASIC_INFO
            return None
        return int(info.resident_size)
    except Exception:
        return None


def _mach_memory() -> tuple[int, int] | None:  # pragma: no cover - macOS only
    """Total from ``hw.memsize``; used = active + wired + compressed pages (``host_statistics64``)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        total = ctypes.c_uint64(0)
        size = ctypes.c_size_t(8)
        if libc.sysctlbyname(b"hw.memsize", ctypes.byref(total), ctypes.byref(size), None, 0) != 0:
            return None
        # vm_statistics64: counts are 32-bit natural_t or 64-bit, in this order (mach/vm_statistics.h).
        words = (ctypes.c_uint32 * 64)()
        count = ctypes.c_uint(38)  # HOST_VM_INFO64_COUNT: sizeof(vm_statistics64) / 4
        libc.mach_host_self.restype = ctypes.c_uint
        if libc.host_statistics64(libc.mach_host_self(), 4, ctypes.byref(words), ctypes.byref(count)) != 0:  # 4: HOST_VM_INFO64
            return None
        active, wired = words[1], words[3]
        compressed = words[2 * 9 + 4 + 2 + 2 * 4]  # after 4 counts, 9 64-bit counters, 2 counts, 4 64-bit counters
        page = os.sysconf("SC_PAGE_SIZE")
        return (active + wired + compressed) * page, int(total.value)
    except Exception:
        return None


# -- NVML ---------------------------------------------------------------------------------------


class Nvml:
    """One NVIDIA GPU through NVML; :meth:`open` gives None where there is no library or no GPU."""

    def __init__(self, module: Any, handle: Any) -> None:
        self.nvml = module
        self.handle = handle

    @classmethod
    def open(cls, module: Any = None) -> Nvml | None:
        """The engine's GPU: ``module`` is pynvml (nvidia-ml-py), imported when not given."""
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return None  # no GPU for this process
        if module is None:
            try:
                import pynvml as module  # type: ignore[import-not-found,no-redef]
            except Exception:  # not installed (an optional extra), or broken
                return None
        try:
            module.nvmlInit()
        except Exception:  # no driver, no GPU
            return None
        try:
            first = (visible or "0").split(",")[0].strip()
            if first.isdigit():
                handle = module.nvmlDeviceGetHandleByIndex(int(first))
            else:  # GPU-<uuid> or MIG-<uuid>
                handle = module.nvmlDeviceGetHandleByUUID(first)
        except Exception:
            with contextlib.suppress(Exception):
                module.nvmlShutdown()
            return None
        return cls(module, handle)

    def read(self) -> dict[str, Any]:
        """Utilisation (percent), memory (bytes) and power (watts); each one that fails is left out."""
        out: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            out["gpu_utilization"] = int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
        with contextlib.suppress(Exception):
            memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            out["gpu_memory_used"], out["gpu_memory_total"] = int(memory.used), int(memory.total)
        with contextlib.suppress(Exception):
            out["gpu_power"] = round(self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0, 1)  # milliwatts
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


def mlx_memory() -> dict[str, int]:
    """MLX's allocator counters in bytes, when the process has loaded mlx (else nothing).

    Three reads of counters the allocator keeps: no array is touched and nothing waits on the
    device, so this is safe between steps."""
    mx = sys.modules.get("mlx.core")
    if mx is None:
        return {}
    try:
        return {
            "mlx_active": int(mx.get_active_memory()),
            "mlx_cache": int(mx.get_cache_memory()),
            "mlx_peak": int(mx.get_peak_memory()),
        }
    except Exception:  # an mlx without these names
        return {}


# -- the sampler ----------------------------------------------------------------------------


class SystemMonitor:
    """Samples the machine every ``seconds`` on its own thread; the loop takes the newest sample."""

    def __init__(self, seconds: float, nvml: Any = None) -> None:
        """``nvml``: a pynvml stand-in (tests); None imports the real one if installed."""
        self.seconds = seconds
        self._nvml_module = nvml
        self._nvml: Nvml | None = None
        self._latest: dict[str, Any] | None = None
        self._lock = threading.Lock()  # the newest sample changes hands between the two threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="tunetop-system", daemon=True)
        self._cpu_mark = (time.monotonic(), _cpu_seconds())

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def take(self) -> dict[str, Any] | None:
        """The sample taken since the last call (None if none), with MLX's counters read now.

        Called by the loop's thread between steps."""
        with self._lock:
            sample, self._latest = self._latest, None
        if sample is None:
            return None
        sample.update(mlx_memory())
        return sample

    def _sample_loop(self) -> None:
        self._nvml = Nvml.open(self._nvml_module)
        try:
            while not self._stop.wait(self.seconds):
                try:
                    sample = self.sample()
                except Exception:  # a reading that fails must not end the thread, nor the run
                    continue
                with self._lock:
                    self._latest = sample
        finally:
            if self._nvml is not None:
                self._nvml.close()

    def sample(self) -> dict[str, Any]:
        """One reading of everything but MLX's counters (see :meth:`take`)."""
        now, cpu = time.monotonic(), _cpu_seconds()
        then, cpu_before = self._cpu_mark
        self._cpu_mark = (now, cpu)
        out: dict[str, Any] = {}
        if now > then:
            out["cpu_percent"] = round(100.0 * max(cpu - cpu_before, 0.0) / (now - then), 1)
        rss = process_rss()
        if rss is not None:
            out["rss"] = rss
        memory = system_memory()
        if memory is not None:
            out["memory_used"], out["memory_total"] = memory
        if self._nvml is not None:
            out.update(self._nvml.read())
        return out


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
