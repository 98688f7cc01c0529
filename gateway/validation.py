"""Turn a public GenerateRequest into token ids and sampling settings, or say exactly what is wrong with it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from kvrelay.sampling import MAX_LOGPROBS, SamplingParams
from kvrelay.tokenizer import Tokenizer
from kvrelay.v1 import gateway_pb2

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
ROLES = ("system", "user", "assistant", "tool")


class InvalidRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def bad(message: str) -> InvalidRequest:
    return InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class ValidRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]


def validate(
    req: gateway_pb2.GenerateRequest, tokenizer: Tokenizer | None, model_name: str, max_model_len: int, vocab_size: int
) -> ValidRequest:
    if req.model and req.model != model_name:
        raise InvalidRequest(grpc.StatusCode.NOT_FOUND, f"unknown model {req.model!r}; this server runs {model_name!r}")
    given = [
        name
        for name, present in (
            ("prompt", bool(req.prompt)),
            ("messages", len(req.messages) > 0),
            ("prompt_token_ids", len(req.prompt_token_ids) > 0),
        )
        if present
    ]
    if not given:
        raise bad("empty prompt: set one of prompt, messages or prompt_token_ids")
    if len(given) > 1:
        raise bad(f"set exactly one of prompt, messages or prompt_token_ids (got {', '.join(given)})")
    if len(req.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise bad(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    if len(req.session_id.encode()) > MAX_REQUEST_ID_BYTES or ":" in req.session_id:
        raise bad(f"session_id must be at most {MAX_REQUEST_ID_BYTES} bytes without ':', got {req.session_id!r:.40}")
    if tokenizer is None and not req.prompt_token_ids:
        raise bad("this model has no tokenizer: send prompt_token_ids")
    if req.prompt:
        ids = tokenizer.encode(req.prompt)
    elif req.messages:
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
        try:
            ids = tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in req.messages])
        except Exception as exc:  # the model's template raised (e.g. roles out of order)
            raise bad(f"chat template rejected the messages: {exc}") from exc
    else:
        ids = list(req.prompt_token_ids)
        wrong = [t for t in ids if not 0 <= t < vocab_size]
        if wrong:
            raise bad(f"prompt_token_ids outside the vocabulary 0..{vocab_size - 1}: {wrong[:5]}")
    if not ids:
        raise bad("empty prompt: it encodes to no tokens")
    if len(ids) >= max_model_len:
        raise bad(f"prompt is {len(ids)} tokens; the context length is {max_model_len} (room for at least one more)")
    if req.HasField("max_tokens") and req.max_tokens <= 0:
        raise bad(f"max_tokens must be > 0, got {req.max_tokens}")
    max_tokens = req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    max_tokens = min(max_tokens, max_model_len - len(ids))  # the context is the hard limit
    if len(req.stop) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings, got {len(req.stop)}")
    for s in req.stop:
        if not s or len(s.encode()) > MAX_STOP_BYTES:
            raise bad(f"each stop string must be 1..{MAX_STOP_BYTES} bytes, got {s!r:.40}")
    if req.HasField("logprobs") and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be in 0..{MAX_LOGPROBS}, got {req.logprobs}")
    s = req.sampling
    try:
        params = SamplingParams(
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            min_p=s.min_p if s.HasField("min_p") else 0.0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            seed=s.seed if s.HasField("seed") else None,
            max_tokens=max_tokens,
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs if req.HasField("logprobs") else None,
        )
    except ValueError as exc:
        raise bad(str(exc)) from exc
    return ValidRequest(ids, params, tuple(req.stop))
