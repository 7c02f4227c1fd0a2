"""Build and register the C++ CPU kernels that XLA calls through its FFI.

Two sources next to this file, compiled into one library: ``cpu_paged_attention.cc`` (the
"cpu" attention backend, see ``cpu_attention.py``) and ``cpu_matmul.cc`` (float32 and bfloat16
matmuls over packed weights, see ``cpu_matmul.py``), with the vector helpers of ``cpu_simd.h``.

The library is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``, ``-O3
-march=native``) against the FFI headers jaxlib ships, and cached under ``$JAXLLM_CACHE_DIR``
(default ``~/.cache/jaxllm``), named by a hash of the sources, the flags, the compiler's version,
jaxlib's version and this CPU's feature flags, so a change to any of them builds a new one.
:func:`cpu_kernels_unavailable_reason` says why the kernels cannot be used here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_paged_attention.cc", "cpu_matmul.cc"))
_HEADERS = (Path(__file__).with_name("cpu_simd.h"),)
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
ATTENTION_TARGET = "jaxllm_cpu_paged_attention"
MATMUL_TARGET = "jaxllm_cpu_matmul"
MATMUL_BF16_TARGET = "jaxllm_cpu_matmul_bf16"
_SYMBOLS = {ATTENTION_TARGET: "JaxllmCpuPagedAttention", MATMUL_TARGET: "JaxllmCpuMatmul",
            MATMUL_BF16_TARGET: "JaxllmCpuMatmulBf16"}


def _cache_dir() -> Path:
    return Path(os.environ.get("JAXLLM_CACHE_DIR") or Path.home() / ".cache" / "jaxllm")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _library() -> Path:
    """Build (or find) the kernels' shared library; raises RuntimeError saying what failed."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    import jaxlib

    key = hashlib.sha256()
    for part in (*(s.read_bytes() for s in (*_SOURCES, *_HEADERS)), " ".join(_FLAGS).encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
    path = _cache_dir() / f"libjaxllm_cpu_kernels_{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            names = ", ".join(s.name for s in _SOURCES)
            raise RuntimeError(f"compiling {names} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        os.replace(built, path)  # atomic: a concurrent build of the same key writes the same bytes
    return path


@functools.cache
def _loaded() -> ctypes.CDLL:
    return ctypes.cdll.LoadLibrary(str(_library()))


@functools.cache
def _register() -> None:
    library = _loaded()
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


@functools.cache
def cpu_kernels_unavailable_reason() -> str | None:
    """None when the kernels are built and registered here, else why not (not on the CPU, no
    compiler, build error). Asked once per process: a failing build is not retried per engine."""
    if jax.default_backend() != "cpu":
        return f"they run on the CPU only, not on {jax.default_backend()!r}"
    try:
        _register()
    except (RuntimeError, OSError, AttributeError) as e:
        return str(e)
    return None


@functools.cache
def amx_usable() -> bool:
    """Whether the matmul kernel's AMX path runs here: the CPU has AMX-TILE, AMX-BF16 and
    AVX-512BW and Linux grants this process the tile state. False where the kernels are not
    usable at all."""
    if cpu_kernels_unavailable_reason() is not None:
        return False
    return bool(_loaded().JaxllmCpuMatmulAmxUsable())
