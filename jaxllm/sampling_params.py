"""Sampling parameters with vLLM's field names and defaults.

Fields that vLLM has but jaxllm does not implement yet are accepted only at their neutral value;
anything else raises ``ValueError`` saying the field is not supported yet, so a request never
silently samples differently from what was asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxllm.engine.messages import SamplingOptions

# field -> the only value accepted until the feature exists.
_UNSUPPORTED_UNLESS_NEUTRAL = {
    "best_of": None,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logprobs": None,
    "prompt_logprobs": None,
    "logit_bias": None,
    "bad_words": None,
}


_MAX_HELD_BACK_STOP_IDS = 12


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_str_list(name: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    values = list(value)
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{name}={value!r} must be a non-empty string or a list of non-empty strings")
    return values


def _as_int_list(name: str, value) -> list[int]:
    if value is None:
        return []
    if _is_int(value):
        value = [value]
    values = list(value)
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ValueError(f"{name}={value!r} must be a list of non-negative integer token ids")
    return values


@dataclass
class SamplingParams:
    """How to sample one request's completion (vLLM's ``SamplingParams``).

    ``stop`` and ``stop_token_ids`` are normalised to lists; ``top_k`` 0 and -1 both mean off.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None

    def __post_init__(self):
        self.stop = _as_str_list("stop", self.stop)
        self.stop_token_ids = _as_int_list("stop_token_ids", self.stop_token_ids)
        self._check_unsupported()
        self._check_sampling()
        self._check_lengths()
        if self.stop and not self.detokenize:
            raise ValueError(f"stop={self.stop!r} needs detokenize=True: stop strings are matched on text")

    def _check_unsupported(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n={self.n!r} must be an integer >= 1")
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported yet; only n=1")
        for name, neutral in _UNSUPPORTED_UNLESS_NEUTRAL.items():
            if getattr(self, name) != neutral:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported yet; leave it at {neutral!r}")

    def _check_sampling(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= -1 (0 or -1: off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")

    def _check_lengths(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        if self.min_tokens and len(self.stop_token_ids or ()) > _MAX_HELD_BACK_STOP_IDS:
            # The sampler holds back eos + stop ids in a fixed-width row (MAX_BANNED_IDS).
            raise ValueError(
                f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {_MAX_HELD_BACK_STOP_IDS} "
                "can be combined with min_tokens > 0"
            )

    @property
    def max_stop_str_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)

    def sampling_options(self, eos_token_ids: tuple[int, ...] = ()) -> SamplingOptions:
        """The subset the device sampler needs.

        Args:
            eos_token_ids: the model's end-of-sequence ids; masked with ``stop_token_ids`` while
                fewer than ``min_tokens`` tokens are generated (unless ``ignore_eos``).
        """
        eos = () if self.ignore_eos else tuple(eos_token_ids)
        masked = tuple(dict.fromkeys(eos + tuple(self.stop_token_ids))) if self.min_tokens else ()
        return SamplingOptions(
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=0 if self.top_k == -1 else self.top_k,
            min_p=float(self.min_p),
            seed=self.seed,
            min_tokens=self.min_tokens,
            min_tokens_masked_ids=masked,
        )
