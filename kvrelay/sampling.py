"""Per-request sampling settings.

A plain frozen dataclass: it travels from the gateway to prefill and decode (pickled or rebuilt from the proto), so it
holds only numbers and tuples. The gateway turns a `ValueError` from here into INVALID_ARGUMENT, so every message names
the field and the value it got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvrelay.v1 import common_pb2

# Below this a temperature is treated as greedy: dividing logits by ~0 overflows to inf and softmax turns it into NaN.
# Same threshold as vLLM, so a client that sends 1e-6 to mean "greedy" gets greedy.
GREEDY_TEMPERATURE = 1e-5

# OpenAI caps top_logprobs at 20; more would only make every step's device-to-host copy bigger.
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    # 0 (or anything below GREEDY_TEMPERATURE) = greedy argmax; the OpenAI default is 1.0.
    temperature: float = 1.0
    # Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p. 1.0 = off.
    top_p: float = 1.0
    # Keep only the k most likely tokens (ties at the k-th value are kept). 0 or -1 = off.
    top_k: int = 0
    # Drop tokens whose probability is below min_p times the most likely token's. 0.0 = off.
    min_p: float = 0.0
    # HF/CTRL-style: seen tokens' positive logits are divided by it, negative ones multiplied. 1.0 = off.
    repetition_penalty: float = 1.0
    # Same seed, same tokens, whatever else shares the batch. None = the process-wide RNG.
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    # Keep going past EOS (benchmarks want a fixed output length); stop_token_ids still stop.
    ignore_eos: bool = False
    # None = no logprobs; 0 = the chosen token's only; n = the chosen token's plus the n most likely alternatives.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept a list from callers (JSON, protos) but store a tuple so the object stays hashable and immutable.
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. The comparisons are written so that NaN fails them too."""
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be an integer > 0, got {self.max_tokens!r}")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not (0 <= self.logprobs <= MAX_LOGPROBS)):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    # bool is an int subclass, but top_k=True is a bug in the caller, not a request for one token.
    return isinstance(value, int) and not isinstance(value, bool)


def params_to_proto(p: SamplingParams) -> common_pb2.WorkerRequestSampling:
    msg = common_pb2.WorkerRequestSampling(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        max_tokens=p.max_tokens,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def params_from_proto(msg: common_pb2.WorkerRequestSampling) -> SamplingParams:
    """Raises ValueError (-> INVALID_ARGUMENT) naming the bad field."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )
