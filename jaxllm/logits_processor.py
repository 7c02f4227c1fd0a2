"""Custom logits processors: vLLM's ``LLM(logits_processors=[...])`` for JAX.

A processor is a class the engine instantiates once, at start-up, and compiles into every step
program. Each step, before penalties, temperature and the top-k/top-p/min-p filters, it may
change the logits of the rows whose requests asked for it, as a pure JAX function:

    class OnlyToken(LogitsProcessor):
        state_dtype = np.int32                  # one int per request: state_shape = ()

        @classmethod
        def validate_params(cls, params):      # at add_request: a ValueError refuses the request
            token = (params.extra_args or {}).get("target_token")
            if token is not None and not isinstance(token, int):
                raise ValueError(f"extra_args target_token={token!r} must be an int")

        def row_state(self, params):            # None: this request's rows are left alone
            return (params.extra_args or {}).get("target_token")

        def apply(self, logits, state):         # traced: logits [R, V] float32, state [R]
            keep = jnp.arange(logits.shape[-1])[None, :] == state[:, None]
            return jnp.where(keep, logits, -jnp.inf)

Requests pass their arguments in ``SamplingParams.extra_args`` (the server's ``vllm_xargs``).
A request's state is computed once, when it is added, so ``apply`` sees a fixed-shape array per
row; rows of requests whose ``row_state`` is None (and padding rows) keep their logits whatever
``apply`` returns, and a step where no row uses the processor skips it. A processor that declares
``is_argmax_invariant()`` (it never changes which token has the largest logit) is skipped for
greedy rows, as in vLLM. Logprobs stay those of the model's raw logits (vLLM's default).

``LLM(logits_processors=[OnlyToken])`` takes classes, or their names as "package.module:Class"
or "package.module.Class" strings (``jaxllm serve --logits-processors``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import jax

    from jaxllm.config import ModelConfig
    from jaxllm.sampling_params import SamplingParams


class LogitsProcessor:
    """Base class of custom logits processors (see the module docstring)."""

    state_shape: tuple[int, ...] = ()  # of one request's state
    state_dtype: Any = np.float32

    def __init__(self, model_config: ModelConfig):
        self.model_config = model_config
        self.vocab_size = model_config.vocab_size

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        """Raise ValueError (naming the argument) for a request this processor cannot serve."""

    def is_argmax_invariant(self) -> bool:
        """True if ``apply`` never changes a row's most likely token: greedy rows then skip it."""
        return False

    def row_state(self, params: SamplingParams) -> Any:
        """A request's state (an array of ``state_shape``), or None: the processor leaves it alone."""
        return None

    def apply(self, logits: jax.Array, state: jax.Array) -> jax.Array:
        """Traced inside the step: logits [R, V] float32 and state [R, *state_shape] -> new logits [R, V]."""
        raise NotImplementedError(f"{type(self).__name__} must define apply(logits, state)")

    @property
    def name(self) -> str:
        return type(self).__name__

    def state_of(self, params: SamplingParams) -> np.ndarray | None:
        """``row_state`` as an array of the declared shape and dtype (ValueError otherwise)."""
        state = self.row_state(params)
        if state is None:
            return None
        array = np.asarray(state)
        if array.shape != tuple(self.state_shape):
            raise ValueError(f"logits processor {self.name}: row_state gave shape {array.shape}, its state_shape "
                             f"is {tuple(self.state_shape)}")
        return array.astype(self.state_dtype)


def resolve(spec: type | str) -> type:
    """A processor class from a class or its "package.module:Class" / "package.module.Class" name."""
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep:
            module_name, _, attr = spec.rpartition(".")
        if not module_name or not attr:
            raise ValueError(f"logits_processors entry {spec!r} must be a class or 'package.module:Class'")
        try:
            spec = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"logits_processors entry {spec!r} cannot be imported: {exc}") from exc
    if not (isinstance(spec, type) and issubclass(spec, LogitsProcessor)):
        raise ValueError(f"logits_processors entry {spec!r} must be a subclass of jaxllm.LogitsProcessor "
                         "(vLLM's torch processors do not run here)")
    return spec


def load_logits_processors(specs: Sequence[type | str] | None, model_config: ModelConfig
                           ) -> tuple[LogitsProcessor, ...]:
    """Instantiate the engine's processors, in order."""
    if specs is None:
        return ()
    if isinstance(specs, (str, type)):
        raise ValueError("logits_processors must be a list of classes or class names")
    return tuple(resolve(spec)(model_config) for spec in specs)
