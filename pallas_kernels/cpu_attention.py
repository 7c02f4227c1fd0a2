"""The "cpu" attention backend: a C++ paged-attention kernel called through XLA's FFI.

The kernel (``cpu_paged_attention.cc``, next to this file) reads the pool in place, block by
block, with an online softmax, on XLA's intra-op threads; it has the semantics of
``jaxllm.models.attention.xla_paged_attention`` and takes float32/bfloat16 pools and the
int8/fp8 pools of ``kv_cache_dtype``, scales included.

It is compiled on first use with the system C++ compiler (``$CXX`` or ``g++``, ``-O3
-march=native``) against the FFI headers jaxlib ships, and the library is cached under
``$JAXLLM_CACHE_DIR`` (default ``~/.cache/jaxllm``), named by a hash of the source, the flags,
the compiler's version, jaxlib's version and this CPU's feature flags, so a change to any of them
builds a new one. :func:`cpu_attention_unavailable_reason` says why it cannot be used here.
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
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention import AttentionMetadata, KVPool
from jaxllm.models.kv_quant import QuantizedKVPool

_SOURCE = Path(__file__).with_name("cpu_paged_attention.cc")
_TARGET = "jaxllm_cpu_paged_attention"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


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
    """Build (or find) the kernel's shared library; raises RuntimeError saying what failed."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    import jaxlib

    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode(), platform.machine().encode()):
        key.update(part)
    path = _cache_dir() / f"libjaxllm_cpu_attention_{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {_SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
        os.replace(built, path)  # atomic: a concurrent build of the same key writes the same bytes
    return path


@functools.cache
def _register() -> None:
    library = ctypes.cdll.LoadLibrary(str(_library()))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.JaxllmCpuPagedAttention), platform="cpu")


@functools.cache
def cpu_attention_unavailable_reason() -> str | None:
    """None when the kernel is built and registered here, else why not (not on the CPU, no
    compiler, build error). Asked once per process: a failing build is not retried per engine."""
    if jax.default_backend() != "cpu":
        return f"it runs on the CPU only, not on {jax.default_backend()!r}"
    try:
        _register()
    except (RuntimeError, OSError, AttributeError) as e:
        return str(e)
    return None


def cpu_paged_attention(q, kv: KVPool, layer, md: AttentionMetadata, sliding_window=None):
    """Engine attention backend (see ``register_attention_backend``) running the C++ kernel.

    q is scored in float32 (as the xla backend does) and the result cast back to q's dtype.
    Padding tokens (past ``cu_q_lens[-1]``) get zero rows.

    Raises:
      ValueError: when traced for a non-CPU device, or when the kernel cannot be built here.
    """
    reason = cpu_attention_unavailable_reason()
    if reason is not None:
        raise ValueError(f"attention_backend='cpu' is not usable here: {reason}")
    if isinstance(kv, QuantizedKVPool):
        pools, scales = (kv.k, kv.v), (kv.k_scale, kv.v_scale)
    else:
        pools, scales = tuple(kv), (jnp.zeros((0,), jnp.float32),) * 2
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), *pools, *scales, jnp.asarray(layer, jnp.int32).reshape(()),
               md.positions, md.block_tables, md.cu_q_lens,
               sliding_window=np.int64(sliding_window or 0), scale=np.float32(q.shape[-1] ** -0.5))
    return out.astype(q.dtype)


# Its cost follows each sequence's own context, not the block table's padded width: the runner
# compiles one width (see ``register_attention_backend``).
cpu_paged_attention.one_block_bucket = True
