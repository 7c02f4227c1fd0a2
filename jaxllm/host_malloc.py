"""glibc malloc settings for running XLA on the CPU.

XLA:CPU allocates an executable's temporaries as one buffer per run: for SmolLM2 10 MB at 8
tokens, 84 MB at 64, 205 MB at 512. glibc serves a block over 32 MB (its largest mmap
threshold) with a fresh ``mmap`` and unmaps it when freed, and XLA's threads each allocate from
their own arena, whose 64 MB heaps cannot hold such a block either: so every step page-faults
every page of its temporaries it touches (measured in benchmarks/throughput.py's run: ~700k
faults and 1.3 s of kernel time in 10 s).

:func:`tune`, called when jaxllm is imported, asks glibc to serve every size from one heap
(``M_ARENA_MAX`` 1, ``M_MMAP_MAX`` 0) and to keep what is freed (``M_TRIM_THRESHOLD`` 2 GiB),
so each step reuses the pages of the one before (the same run: 9k faults, 0.16 s). Arenas are
given to threads on their first allocation, so this must happen before JAX starts its threads:
import jaxllm before running JAX code. It applies only where XLA computes on the host (no CUDA
plugin installed, or ``JAX_PLATFORMS=cpu``) and the C library is glibc; set
``JAXLLM_MALLOC_TUNING=0`` to leave malloc alone. The cost: freed host memory under 2 GiB stays
with the process, and threads share one malloc arena.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

# None until tune() ran; then whether glibc took the settings (see tuned()).
_tuned: bool | None = None


def _host_computes() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_cuda12_plugin", "jax_cuda13_plugin")
    for name in plugins:
        try:
            if importlib.util.find_spec(name) is not None:
                return False
        except (ImportError, ValueError):
            continue
    return True


def tune() -> bool:
    """Apply the settings once per process (see the module docstring); True if glibc took them."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("JAXLLM_MALLOC_TUNING", "1") == "0" or not _host_computes():
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS): leave it
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned = all(mallopt(option, value) == 1 for option, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _tuned


def tuned() -> bool:
    """Whether :func:`tune` applied the settings in this process."""
    return bool(_tuned)
