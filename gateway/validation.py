"""Turn a public GenerateRequest into token ids and sampling settings, or say exactly what is wrong with it.

Three steps, so that the expensive one never runs for a request the cheap ones refuse and never runs on the event
loop: `check` (every field, ids, sizes and sampling ranges: microseconds), `tokenize` (the chat template and the
tokenizer: about a second per MB of text, so the server runs it in a `Validator`'s thread pool), `finish` (what
depends on the token count: the context length, max_tokens). `validate` is the three in a row.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from kvrelay.ids import MAX_CLIENT_SESSION_CHARS, InvalidId, check_id, check_stop_token_ids, check_token_ids
from kvrelay.sampling import MAX_LOGPROBS, SamplingParams
from kvrelay.tokenizer import Tokenizer
from kvrelay.v1 import gateway_pb2

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_PROMPT_BYTES = 1 << 20  # GatewaySettings.max_prompt_bytes
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
ROLES = ("system", "user", "assistant", "tool")
# Text up to this size is tokenized on the event loop (well under a millisecond): a thread hop would cost more, and
# short prompts never queue behind long ones for the pool's threads.
INLINE_TOKENIZE_BYTES = 1024


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


@dataclass(frozen=True)
class Checked:
    """A request whose fields passed `check`: its prompt in plain Python (one of the three), ready to tokenize."""

    params: SamplingParams  # max_tokens not yet capped by the context
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    token_ids: list[int] | None = None
    prompt_bytes: int = 0  # UTF-8 bytes of prompt or messages: what tokenizing costs

    @property
    def needs_tokenizing(self) -> bool:
        return self.token_ids is None


def check(
    req: gateway_pb2.GenerateRequest,
    *,
    model_name: str,
    vocab_size: int,
    has_tokenizer: bool = True,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
) -> Checked:
    """Every check that does not need the token count; raises InvalidRequest naming the field."""
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
    try:
        check_id("request_id", req.request_id, allow_empty=True)
        check_id("session_id", req.session_id, allow_empty=True, max_chars=MAX_CLIENT_SESSION_CHARS)
        check_stop_token_ids(req.stop_token_ids, vocab_size)
    except InvalidId as exc:
        raise bad(str(exc)) from None
    if not has_tokenizer and not req.prompt_token_ids:
        raise bad("this model has no tokenizer: send prompt_token_ids")
    if req.HasField("max_tokens") and req.max_tokens <= 0:
        raise bad(f"max_tokens must be > 0, got {req.max_tokens}")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise bad(f"at most {MAX_STOP_STRINGS} stop strings, got {len(req.stop)}")
    for s in req.stop:
        if not s or len(s.encode()) > MAX_STOP_BYTES:
            raise bad(f"each stop string must be 1..{MAX_STOP_BYTES} bytes, got {s!r:.40}")
    if req.HasField("logprobs") and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be in 0..{MAX_LOGPROBS}, got {req.logprobs}")
    params = _sampling(req)
    if req.prompt_token_ids:
        ids = list(req.prompt_token_ids)
        try:
            check_token_ids("prompt_token_ids", ids, vocab_size)
        except InvalidId as exc:
            raise bad(str(exc)) from None
        return Checked(params, token_ids=ids)
    if req.prompt:
        size = len(req.prompt.encode())
        _check_size("prompt", size, max_prompt_bytes)
        return Checked(params, prompt=req.prompt, prompt_bytes=size)
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r:.40}")
    messages = tuple({"role": m.role, "content": m.content} for m in req.messages)
    size = sum(len(m["role"]) + len(m["content"].encode()) for m in messages)
    _check_size("messages", size, max_prompt_bytes)
    return Checked(params, messages=messages, prompt_bytes=size)


def _check_size(field: str, size: int, limit: int) -> None:
    if size > limit:
        raise bad(f"{field} is {size} bytes; this server takes at most {limit} (its max_prompt_bytes)")


def _sampling(req: gateway_pb2.GenerateRequest) -> SamplingParams:
    s = req.sampling
    try:
        return SamplingParams(
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            min_p=s.min_p if s.HasField("min_p") else 0.0,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            seed=s.seed if s.HasField("seed") else None,
            max_tokens=req.max_tokens if req.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
            stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            logprobs=req.logprobs if req.HasField("logprobs") else None,
        )
    except ValueError as exc:
        raise bad(str(exc)) from exc


def tokenize(checked: Checked, tokenizer: Tokenizer | None) -> list[int]:
    """The prompt's token ids (the chat template applied to messages). Heavy for long text: run it off the loop."""
    if checked.token_ids is not None:
        return checked.token_ids
    if checked.prompt is not None:
        return tokenizer.encode(checked.prompt)
    try:
        return tokenizer.encode_chat(list(checked.messages))
    except Exception as exc:  # the model's template raised (e.g. roles out of order)
        raise bad(f"chat template rejected the messages: {exc}") from exc


def finish(req: gateway_pb2.GenerateRequest, checked: Checked, ids: list[int], max_model_len: int) -> ValidRequest:
    """The checks that need the token count, and max_tokens capped by the context."""
    if not ids:
        raise bad("empty prompt: it encodes to no tokens")
    if len(ids) >= max_model_len:
        raise bad(f"prompt is {len(ids)} tokens; the context length is {max_model_len} (room for at least one more)")
    max_tokens = min(checked.params.max_tokens, max_model_len - len(ids))  # the context is the hard limit
    return ValidRequest(ids, dataclasses.replace(checked.params, max_tokens=max_tokens), tuple(req.stop))


def validate(
    req: gateway_pb2.GenerateRequest,
    tokenizer: Tokenizer | None,
    model_name: str,
    max_model_len: int,
    vocab_size: int,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
) -> ValidRequest:
    """check, tokenize and finish in the calling thread."""
    checked = check(
        req,
        model_name=model_name,
        vocab_size=vocab_size,
        has_tokenizer=tokenizer is not None,
        max_prompt_bytes=max_prompt_bytes,
    )
    return finish(req, checked, tokenize(checked, tokenizer), max_model_len)


class Validator:
    """validate() for the server: the same checks, with tokenizing in a bounded thread pool.

    A 3.9 MB prompt takes seconds to tokenize; on the event loop that stalled every other stream of the gateway for as
    long. The tokenizers library releases the GIL while it encodes, so a thread is enough; chat templates (jinja)
    hold it, but only in slices. At most `threads` prompts are tokenized at once; more wait for a thread.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        model_name: str,
        max_model_len: int,
        vocab_size: int,
        max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
        threads: int = 2,
    ) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_model_len, self.vocab_size, self.max_prompt_bytes = max_model_len, vocab_size, max_prompt_bytes
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kvrelay-tokenize")

    async def __call__(self, req: gateway_pb2.GenerateRequest) -> ValidRequest:
        checked = check(
            req,
            model_name=self.model_name,
            vocab_size=self.vocab_size,
            has_tokenizer=self.tokenizer is not None,
            max_prompt_bytes=self.max_prompt_bytes,
        )
        if checked.needs_tokenizing and checked.prompt_bytes > INLINE_TOKENIZE_BYTES:
            ids = await asyncio.get_running_loop().run_in_executor(self._pool, tokenize, checked, self.tokenizer)
        else:
            ids = tokenize(checked, self.tokenizer)
        return finish(req, checked, ids, self.max_model_len)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
