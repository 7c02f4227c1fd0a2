"""vLLM's profiler API (``LLM.start_profile`` / ``stop_profile``, the server's ``/start_profile``
and ``/stop_profile``) on JAX's profiler: the trace of everything between the two calls (the
engine's steps, each jitted program's device work, host threads) goes to a directory, for
TensorBoard's profile plugin, XProf or Perfetto (``*.xplane.pb``, ``*.trace.json.gz``).

The directory is the call's ``profile_dir``, else ``JAXLLM_PROFILER_DIR`` (or vLLM's
``VLLM_TORCH_PROFILER_DIR``); as in vLLM, the server serves the two routes only when one of those
is set.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

PROFILER_DIR_ENV = ("JAXLLM_PROFILER_DIR", "VLLM_TORCH_PROFILER_DIR")


def profiler_dir_from_env() -> str | None:
    return next((os.environ[name] for name in PROFILER_DIR_ENV if os.environ.get(name)), None)


class Profiler:
    """One trace at a time (JAX's profiler is process-wide)."""

    def __init__(self):
        self.running: Path | None = None  # where the trace being recorded goes

    def start(self, profile_dir: str | os.PathLike | None = None) -> Path:
        if self.running is not None:
            raise ValueError(f"a profile is already being recorded (into {self.running}); stop_profile first")
        chosen = profile_dir or profiler_dir_from_env()
        if chosen is None:
            raise ValueError(f"start_profile needs a directory: pass profile_dir, or set {PROFILER_DIR_ENV[0]} "
                             f"(or {PROFILER_DIR_ENV[1]})")
        path = Path(chosen).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        jax.profiler.start_trace(str(path))
        self.running = path
        return path

    def stop(self) -> Path:
        """Waits for the device's queued work, then writes the trace; returns its directory."""
        if self.running is None:
            raise ValueError("no profile is being recorded; start_profile first")
        jax.effects_barrier()
        jax.profiler.stop_trace()
        path, self.running = self.running, None
        return path


PROFILER = Profiler()
