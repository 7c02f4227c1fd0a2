"""jaxllm.host_malloc: glibc keeps XLA:CPU's per-run temporaries instead of mmapping them afresh.

Each case runs in a fresh interpreter: the settings must precede JAX's threads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not sys.platform.startswith("linux"), reason="glibc on a CPU host"
)

# A jitted step whose temporaries (a [2048, 8192] float32 intermediate, 64 MB) exceed glibc's
# largest mmap threshold; the page faults of 60 runs after a warm-up are counted.
_PROBE = """
import resource, sys
import jaxllm
from jaxllm import host_malloc
import jax, jax.numpy as jnp

@jax.jit
def step(x, w):
    return jnp.tanh(x @ w) @ w.T  # the [2048, 8192] operand of the second dot is a temporary

x, w = jnp.ones((2048, 64)), jnp.ones((64, 8192)) / 64
step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(60):
    step(x, w).block_until_ready()
print(host_malloc.tuned(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_runs_reuse_their_temporaries():
    tuned, faults = _probe()
    untuned, untuned_faults = _probe(JAXLLM_MALLOC_TUNING="0")
    assert tuned and not untuned
    # Untuned, each run faults in its 64 MB of temporaries again (16k pages a run); tuned, the
    # heap settles after a few runs (30-80k faults in all, measured).
    assert untuned_faults > 60 * 8000
    assert faults < untuned_faults / 5


def test_left_alone_where_the_host_does_not_compute():
    tuned, _ = _probe(JAX_PLATFORMS="cpu")
    assert tuned
    code = "import jaxllm; from jaxllm import host_malloc; print(host_malloc.tuned())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cuda"},
                         capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert out == "False"
