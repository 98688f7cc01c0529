"""gateway/validation.py without a server: ids (kvrelay/ids.py, the same checks the workers and the session store
make), stop_token_ids, the prompt byte limit checked before any tokenizing, and the Validator tokenizing off the
event loop (the loop keeps turning while a long prompt is tokenized)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.validation import InvalidRequest, Validator, validate
from kvrelay.ids import MAX_STOP_TOKEN_IDS, is_valid_id
from kvrelay.rpc.grpc_server import start_server, stop_server
from kvrelay.tokenizer import Tokenizer
from kvrelay.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.kvrelay.test_grpc_server import free_port

VOCAB = 1000
MODEL = "m"


class CharTokenizer:
    """One token per character (ids mod VOCAB); `delay_s` per call stands in for a long prompt's tokenizing."""

    eos_token_ids = (0,)

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        time.sleep(self.delay_s)  # releases the GIL, as the tokenizers library does while it encodes
        return [ord(c) % VOCAB for c in text]

    def encode_chat(self, messages) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages))


def req(**fields) -> gateway_pb2.GenerateRequest:
    sampling = fields.pop("sampling", {})
    return gateway_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(**sampling), **fields)


def check(request: gateway_pb2.GenerateRequest, tokenizer=None, **kwargs):
    return validate(request, tokenizer or CharTokenizer(), MODEL, 256, VOCAB, **kwargs)


def refused(request, tokenizer=None, **kwargs) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as err:
        check(request, tokenizer, **kwargs)
    return err.value


@pytest.mark.parametrize(
    "value",
    [" x", "x ", "a:b", "a b", "a\n", "\t", "é", "日本", "a*", "x" * 129, "\x00", "a\u200b"],
)
@pytest.mark.parametrize("field", ["session_id", "request_id"])
def test_bad_ids_are_invalid_argument_naming_the_field(field, value):
    err = refused(req(prompt="hi", **{field: value}))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.message
    assert not is_valid_id(value)


@pytest.mark.parametrize("value", ["", "x", "abc-DEF_0.9", "user@example.com", "a/b+c=d~e", "x" * 111])
def test_good_ids_pass(value):
    check(req(prompt="hi", session_id=value, request_id=value))


def test_a_session_id_leaves_room_for_an_api_key_namespace():
    """The gateway may store a session as "<16 hex>.<session_id>" (API keys): that must stay a valid id."""
    check(req(prompt="hi", request_id="x" * 128))
    err = refused(req(prompt="hi", session_id="x" * 112))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in err.message and "111" in err.message
    assert is_valid_id("0123456789abcdef." + "x" * 111)


@pytest.mark.parametrize(
    "ids, words",
    [
        ([VOCAB], "outside the vocabulary"),
        ([-1], "outside the vocabulary"),
        ([5, 2**31 - 1], "outside the vocabulary"),
        (list(range(MAX_STOP_TOKEN_IDS + 1)), f"at most {MAX_STOP_TOKEN_IDS}"),
    ],
)
def test_stop_token_ids_are_checked(ids, words):
    err = refused(req(prompt="hi", stop_token_ids=ids))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in err.message and words in err.message


def test_good_stop_token_ids_reach_the_sampling_params():
    valid = check(req(prompt="hi", stop_token_ids=list(range(MAX_STOP_TOKEN_IDS))))
    assert valid.params.stop_token_ids == tuple(range(MAX_STOP_TOKEN_IDS))


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"prompt": "x" * 101}, "prompt"),
        ({"prompt": "é" * 51}, "prompt"),  # bytes, not characters
        ({"messages": [gateway_pb2.ChatMessage(role="user", content="x" * 60)] * 2}, "messages"),
    ],
)
def test_a_prompt_over_the_byte_limit_is_refused_before_tokenizing(fields, name):
    tokenizer = CharTokenizer()
    err = refused(req(**fields), tokenizer, max_prompt_bytes=100)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and name in err.message and "at most 100" in err.message
    assert tokenizer.calls == 0


def test_cheap_checks_come_before_tokenizing():
    tokenizer = CharTokenizer()
    for bad in (req(prompt="hi", sampling={"temperature": -1.0}), req(prompt="hi", max_tokens=0)):
        refused(bad, tokenizer)
    assert tokenizer.calls == 0


def test_max_tokens_is_capped_by_the_context():
    assert check(req(prompt="x" * 200, max_tokens=100)).params.max_tokens == 56
    assert check(req(prompt="x" * 10)).params.max_tokens == 246  # the default (256) capped too


def test_the_validator_tokenizes_off_the_event_loop():
    """A prompt that takes 1 s to tokenize: the loop's ticks stay ~10 ms apart meanwhile (on the loop: one 1 s gap),
    and a short request sent meanwhile is answered at once (inline, not queued behind it)."""

    async def main():
        tokenizer = CharTokenizer(delay_s=1.0)
        validator = Validator(tokenizer, MODEL, 1 << 20, VOCAB, threads=1)
        gaps, stop = [], asyncio.Event()

        async def tick():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        long = asyncio.create_task(validator(req(prompt="x" * 100_000)))
        await asyncio.sleep(0.1)
        tokenizer.delay_s = 0.0
        t0 = time.perf_counter()
        short = await validator(req(prompt="hello"))
        short_s = time.perf_counter() - t0
        valid = await long
        stop.set()
        await ticker
        validator.close()
        return valid, short, short_s, max(gaps)

    valid, short, short_s, worst_gap = asyncio.run(main())
    assert len(valid.prompt_token_ids) == 100_000 and short.prompt_token_ids == [ord(c) for c in "hello"]
    assert worst_gap < 0.3 and short_s < 0.3


def test_the_real_tokenizer_gives_the_same_ids_through_the_validator(default_model_dir):
    tokenizer = Tokenizer.from_dir(default_model_dir)
    text = "The river begins in the mountains. " * 200  # over the inline limit: tokenized in the pool
    messages = [gateway_pb2.ChatMessage(role="user", content=text)]

    async def main():
        validator = Validator(tokenizer, MODEL, 1 << 20, tokenizer.vocab_size)
        try:
            return await validator(req(prompt=text)), await validator(req(messages=messages))
        finally:
            validator.close()

    raw, chat = asyncio.run(main())
    assert raw.prompt_token_ids == tokenizer.encode(text)
    assert chat.prompt_token_ids == tokenizer.encode_chat([{"role": "user", "content": text}])


def test_the_real_tokenizer_leaves_the_event_loop_alone(default_model_dir):
    """tokenizers' `encode` keeps the GIL from the event loop for as long as it works, in a process that serves gRPC
    (as the gateway does), even from another thread: the loop did not turn once while a 1 MB prompt was tokenized.
    kvrelay's Tokenizer calls a variant that lets go of it."""
    tokenizer = Tokenizer.from_dir(default_model_dir)
    text = ("The river begins in the mountains, where snow melts each spring. " * 20_000)[:1_000_000]

    async def main():
        server, health = await start_server(
            [(gateway_pb2_grpc.add_GatewayServicer_to_server, gateway_pb2_grpc.GatewayServicer())],
            ["kvrelay.v1.Gateway"],
            free_port(),
        )
        validator = Validator(tokenizer, MODEL, 1 << 30, tokenizer.vocab_size, max_prompt_bytes=2_000_000)
        ticks, stop = [time.perf_counter()], asyncio.Event()

        async def tick():
            while not stop.is_set():
                await asyncio.sleep(0.005)
                ticks.append(time.perf_counter())

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        valid = await validator(req(prompt=text))
        t1 = time.perf_counter()
        stop.set()
        await ticker
        validator.close()
        await stop_server(server, health, grace_s=0)
        return valid, t1 - t0, max(b - a for a, b in zip(ticks, ticks[1:], strict=False) if b >= t0)

    valid, took, worst_gap = asyncio.run(main())
    assert len(valid.prompt_token_ids) > 100_000
    assert worst_gap < max(0.25, took / 4), f"the loop stalled {worst_gap:.2f} s of the {took:.2f} s tokenizing took"
