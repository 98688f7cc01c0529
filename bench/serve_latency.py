"""Latency seen by a gRPC client of a real deployment (`kvrelay up`): inter-token latency, time to first token, and
the hand-off's added latency (prefill reply -> decode's first token, minus one decode step).

    python -m bench.serve_latency --model DIR [--kv-dtype int8] [--max-model-len 4096] [--no-decode-overlap]

--no-decode-overlap runs the decode loop that waits for every step (records named *_no_overlap), for comparison.
--trace logs the hand-off's timeline in every process (KVRELAY_TRACE_HANDOFF=1) and prints its medians relative to
prefill's offer; records are not written then (the marks cost a little on the path they time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from bench.common import copy_bandwidth, record, write_benchmarks_md
from bench.model_bench import weight_bytes
from kvrelay import trace
from kvrelay.client import AsyncClient
from kvrelay.deployment import Deployment
from kvrelay.model_config import ModelConfig
from kvstore.formats import bytes_per_token, parse_kv_dtype
from services.model.llama import LlamaForCausalLM

COMMAND = "python -m bench.serve_latency --model DIR"


async def stream(client: AsyncClient, ids: list[int], max_tokens: int):
    arrivals, finish = [], None
    start = time.perf_counter()
    async for chunk in client.generate(prompt_token_ids=ids, max_tokens=max_tokens, ignore_eos=True, temperature=0.0):
        arrivals.append(time.perf_counter())
        if chunk.HasField("finish"):
            finish = chunk.finish
    return start, arrivals, finish


def floor_ms(model_dir: str, kv: str, ctx: int, bw: float) -> float:
    config = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    spec = parse_kv_dtype(kv, torch.bfloat16)
    per_token = bytes_per_token(spec, config.num_layers, config.num_kv_heads, config.head_dim)
    return (weight_bytes(model) + ctx * per_token) / bw * 1e3


N_HANDOFF = 20  # requests timed for the hand-off and TTFT medians


async def measure(address: str, vocab: int, ctx: int, n_tokens: int, n_handoff: int):
    gen = torch.Generator().manual_seed(0)
    async with AsyncClient(address) as client:
        prompt = torch.randint(0, vocab, (ctx,), generator=gen).tolist()
        await stream(client, prompt, 8)  # warm-up
        start, arrivals, finish = await stream(client, prompt, n_tokens)
        gaps = [(b - a) * 1e3 for a, b in zip(arrivals[1:], arrivals[2:], strict=False)]
        itl = statistics.median(gaps)
        ttft_one = (arrivals[0] - start) * 1e3
        handoffs, decode_side, ttfts, prefills = [], [], [], []
        for _ in range(n_handoff):
            p = torch.randint(0, vocab, (ctx,), generator=gen).tolist()
            s, arr, f = await stream(client, p, 4)
            handoffs.append(f.timings.handoff_ms)
            decode_side.append(f.timings.handoff_decode_ms)
            ttfts.append((arr[0] - s) * 1e3)
            prefills.append(f.timings.prefill_ms)
        # TTFT: the median over the hand-off requests (fresh prompts of ctx tokens); one request alone moved by
        # ~10 ms between runs. The single timed request's TTFT is kept beside it.
        ttft = {"median": statistics.median(ttfts), "one": ttft_one, "prefill_median": statistics.median(prefills)}
        return itl, ttft, statistics.median(handoffs), statistics.median(decode_side), finish


def print_timeline(text: str, itl: float, ttft: dict, handoff: float) -> None:
    print(f"ITL {itl:.3f} ms, TTFT median {ttft['median']:.3f} ms (prefill {ttft['prefill_median']:.3f} ms), "
          f"hand-off p50 {handoff:.3f} ms; medians over the requests, ms after prefill's offer in Redis:")  # fmt: skip
    for event, ms, n in trace.median_offsets(text, "pf_offered"):
        print(f"  {event:<18} {ms:+9.3f}  ({n} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kv-dtype", default="int8")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--no-decode-overlap", action="store_true", help="decode waits for each step's tokens")
    parser.add_argument("--trace", action="store_true", help="print the hand-off timeline; write no records")
    args = parser.parse_args()
    if args.trace:
        os.environ["KVRELAY_TRACE_HANDOFF"] = "1"  # inherited by every process of the deployment
    suffix, command = ("_no_overlap", COMMAND + " --no-decode-overlap") if args.no_decode_overlap else ("", COMMAND)
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    d = Deployment(
        "--model",
        args.model,
        "--kv-dtype",
        args.kv_dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--kv-cache-mb",
        "16384",
        "--max-batch-tokens",
        "8192",
        *(["--no-decode-overlap"] if args.no_decode_overlap else []),
    )
    try:
        vocab = ModelConfig.from_dir(args.model).vocab_size
        itl, ttft, handoff, decode_side, finish = asyncio.run(measure(d.address, vocab, args.ctx, 128, N_HANDOFF))
    finally:
        d.stop()
    if args.trace:
        print_timeline(d.output(), itl, ttft, handoff)
        return
    floor = floor_ms(args.model, args.kv_dtype, args.ctx + 64, bw)
    record("client_itl_bs1_ctx1k" + suffix, itl, "ms", floor, floor / itl, command)
    record("client_ttft_ctx1k" + suffix, ttft["median"], "ms", 0.0, 0.0, command,
           note=f"no floor: TTFT includes prefill and gRPC; median of {N_HANDOFF} requests",
           ttft_one_request_ms=round(ttft["one"], 3), prefill_median_ms=round(ttft["prefill_median"], 3))  # fmt: skip
    added = max(handoff - itl, 1e-3)  # the first decode message costs one decode step anyway
    record("handoff_p50" + suffix, added, "ms", 2.0, 2.0 / added, command, handoff_ms_raw=round(handoff, 3))
    # For diagnosis: the decode worker's side (prefill's offer seen -> first token ready, its clock) beyond one step,
    # and the rest of the raw hand-off (transport and gateway; negative when decode started before the gateway
    # had prefill's reply).
    print(
        f"hand-off p50 {handoff:.3f} ms: decode side {decode_side:.3f} ms ({decode_side - itl:+.3f} ms beyond one "
        f"ITL), transport and gateway {handoff - decode_side:+.3f} ms"
    )
    print(f"last request: {finish.completion_tokens} tokens, timings {finish.timings}")
    write_benchmarks_md()


if __name__ == "__main__":
    main()
