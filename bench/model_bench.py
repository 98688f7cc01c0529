"""Decode and prefill of a whole model on one GPU, through the code the workers run (ModelRunner, decode graphs).

    python -m bench.model_bench --model DIR [--kv-dtype int8] [--decode] [--prefill]

Decode: steps of batch 1..128 at 1k and 8k contexts (random K/V in the pool, random block ids), timed as the decode
worker runs them: 20 graph replays queued back to back, each one's input ids the previous one's argmax on the device
(step_ms; one step queued from an idle host, launch latency included, is one_step_ms beside it); floor = weight
bytes + KV bytes read per step over the measured copy bandwidth. Prefill: one prompt of 512, 2k, 8k tokens; floor =
FLOPs over the measured bf16 matmul rate (MFU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bench.common import RESULTS, copy_bandwidth_samples, matmul_rate, record, time_ms, write_benchmarks_md
from kvrelay.model_config import ModelConfig
from kvstore.block_table import blocks_needed, slot_mapping
from kvstore.formats import bytes_per_token, parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry
from services.model.loader import load_model
from services.model.runner import ModelRunner, SeqChunk

COMMAND = "python -m bench.model_bench --model DIR"


# Steps timed back to back (queued ahead, as the worker queues them); one step alone is recorded beside it.
CHAIN = 20


def fill_random(pool: KVPool) -> None:
    """Random K/V and scales: zero pages would flatter nothing here, but random data is the honest default."""
    for t in (pool.k_cache, pool.v_cache):
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 127, t.shape, dtype=torch.int8, device=t.device))
        else:
            t.copy_((torch.randn(t.shape, device=t.device) * 0.5).to(t.dtype))
    for s in (pool.k_scale, pool.v_scale):
        if s is not None:
            s.uniform_(0.001, 0.02)


def weight_bytes(model) -> int:
    # the embedding table is gathered (bs rows), not streamed; a tied lm_head is counted once as lm_head
    return sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if n != "model.embed_tokens.weight"
    ) + (model.lm_head.weight.numel() * model.lm_head.weight.element_size() if model.config.tie_word_embeddings else 0)


def decode_floor_bytes(model, spec, bs: int, ctx: int) -> int:
    """Bytes a decode step of bs sequences at context ctx must read: the weights and every sequence's KV."""
    c = model.config
    return weight_bytes(model) + bs * (ctx + 1) * bytes_per_token(spec, c.num_layers, c.num_kv_heads, c.head_dim)


def decode_step(model, spec, bs: int, ctx: int, block_size: int):
    """A pool of random K/V for bs sequences at context ctx (their blocks in random order), a runner with CUDA graphs
    for the batch, and one step's device inputs: (runner, chunks, inputs for runner.graphs.replay)."""
    c = model.config
    blocks_per_seq = blocks_needed(ctx + 1, block_size)
    need = bs * blocks_per_seq
    pool = KVPool.allocate(PoolGeometry(c.num_layers, need, block_size, c.num_kv_heads, c.head_dim), spec, "cuda")
    fill_random(pool)
    runner = ModelRunner(model, pool)
    runner.enable_cuda_graphs(bs, ctx + 1)
    perm = torch.randperm(need).tolist()
    chunks = [SeqChunk((7,), ctx, tuple(perm[i * blocks_per_seq : (i + 1) * blocks_per_seq])) for i in range(bs)]
    slots = [slot_mapping(list(ch.block_table), ctx, ctx + 1, block_size)[0] for ch in chunks]
    ids, positions, slots = (t.cuda() for t in (torch.full((bs,), 7), torch.full((bs,), ctx), torch.tensor(slots)))
    tables = torch.tensor([list(ch.block_table) for ch in chunks], dtype=torch.int32, device="cuda")
    lens = torch.full((bs,), ctx + 1, dtype=torch.int32, device="cuda")
    return runner, chunks, (ids, positions, slots, tables, lens)


def chained_step_ms(runner, inputs) -> float:
    """Milliseconds a step, as the decode worker runs them (services/decode/step_loop.py): step n+1 is queued, its
    input ids step n's sampled ids still on the device, before step n completes; the device runs CHAIN steps back to
    back."""
    ids, *rest = inputs

    def chained():
        out = ids
        for _ in range(CHAIN):
            out = runner.graphs.replay(out, *rest).argmax(-1)

    return time_ms(chained, warmup=2, iters=10) / CHAIN


def decode_one(model, config: ModelConfig, spec, bw: float, bs: int, ctx: int, block_size: int, save=True) -> float:
    """One (batch, context) point, recorded when `save`; returns the fraction of the floor. A function so that its
    pool is freed when it returns."""
    per_token = bytes_per_token(spec, config.num_layers, config.num_kv_heads, config.head_dim)
    need = bs * blocks_needed(ctx + 1, block_size)
    torch.cuda.empty_cache()
    if need * block_size * per_token > 0.9 * torch.cuda.mem_get_info()[0]:
        gib = need * block_size * per_token / 2**30
        print(f"decode bs{bs} ctx{ctx}: {gib:.1f} GiB of KV does not fit next to the weights, skipped")
        return 0.0
    runner, chunks, inputs = decode_step(model, spec, bs, ctx, block_size)
    g = runner.graphs
    # One step alone (queued from an idle host): the graph's launch latency is in it.
    one_ms = time_ms(lambda: g.replay(*inputs).argmax(-1), iters=50)
    gpu_ms = chained_step_ms(runner, inputs)
    wall = []
    for _ in range(30):  # host prep + replay + greedy + sync, as the decode worker's step does it
        t = time.perf_counter()
        runner.forward(chunks).argmax(-1).tolist()
        wall.append((time.perf_counter() - t) * 1e3)
    wall_ms = sorted(wall)[len(wall) // 2]
    floor_ms = decode_floor_bytes(model, spec, bs, ctx) / bw * 1e3
    name = f"decode_bs{bs}_ctx{ctx // 1024}k"
    if not save:
        print(f"{name}: {gpu_ms:.3f} ms a step ({one_ms:.3f} alone), floor {floor_ms:.3f} ms, "
              f"fraction {floor_ms / gpu_ms:.3f}")  # fmt: skip
        return floor_ms / gpu_ms
    record(
        name,
        bs / gpu_ms * 1e3,
        "tok/s",
        bs / floor_ms * 1e3,
        floor_ms / gpu_ms,
        COMMAND,
        step_ms=round(gpu_ms, 4),
        one_step_ms=round(one_ms, 4),
        floor_ms=round(floor_ms, 4),
        wall_step_ms=round(wall_ms, 4),
    )
    return floor_ms / gpu_ms


def setting_sweep(model, config: ModelConfig, spec, bw: float, batches, setting: str, block_size: int,
                  contexts=(1024,)) -> None:  # fmt: skip
    """Decode (at 1k context unless --contexts is given) for each value of a kernel module's setting, e.g.
    kernels.triton_rotary_store_kv.FUSED=0,1 (read at launch, so graphs captured again per value pick it up); several
    settings joined by '+' move together, value by value (A.X=1,0+A.Y=64,128: X=1 with Y=64, then X=0 with Y=128);
    written to bench/results/tune_settings.json, the settings restored afterwards. An A/B inside one process, on one
    warm GPU."""
    import importlib

    targets = []
    for part in setting.split("+"):
        target, values = part.split("=")
        module_name, attr = target.rsplit(".", 1)
        targets.append((target, importlib.import_module(module_name), attr, values.split(",")))
    if len({len(t[3]) for t in targets}) != 1:
        raise SystemExit(f"--sweep {setting}: every setting needs as many values")
    defaults, rows = [getattr(module, attr) for _, module, attr, _ in targets], []
    for i in range(len(targets[0][3])):
        label = "+".join(f"{target}={values[i]}" for target, _, _, values in targets)
        for (_, module, attr, values), default in zip(targets, defaults, strict=True):
            setattr(module, attr, type(default)(float(values[i])))
        for ctx in contexts:
            for bs in batches:
                print(f"{label}: ", end="")
                fraction = decode_one(model, config, spec, bw, bs, ctx, block_size, save=False)
                rows.append({"setting": label, "batch": bs, "context": ctx, "fraction": round(fraction, 4)})
    for (_, module, attr, _), default in zip(targets, defaults, strict=True):
        setattr(module, attr, default)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tune_settings.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}))


def decode_bench(model, config: ModelConfig, spec, bw: float, batches, contexts, block_size: int) -> None:
    for ctx in contexts:
        for bs in batches:
            decode_one(model, config, spec, bw, bs, ctx, block_size)


def prefill_flops(config: ModelConfig, n: int, model) -> float:
    linear = sum(
        p.numel() for name, p in model.named_parameters() if name.endswith("proj.weight")
    )  # q/k/v/o and the MLP: every token goes through them
    attn = config.num_layers * 2 * n * n * config.num_heads * config.head_dim  # QK^T and PV, causal half each
    return 2 * n * linear + attn + 2 * config.hidden_size * config.vocab_size  # + the last token's logits


def prefill_bench(model, config: ModelConfig, spec, rate: float, lengths, block_size: int) -> None:
    for n in lengths:
        blocks = blocks_needed(n, block_size)
        geometry = PoolGeometry(config.num_layers, blocks, block_size, config.num_kv_heads, config.head_dim)
        pool = KVPool.allocate(geometry, spec, "cuda")
        runner = ModelRunner(model, pool)
        ids = torch.randint(0, config.vocab_size, (n,)).tolist()
        chunk = [SeqChunk(tuple(ids), 0, tuple(torch.randperm(blocks).tolist()))]
        ms = time_ms(lambda r=runner, c=chunk: r.forward(c), warmup=3, iters=10)
        floor_ms = prefill_flops(config, n, model) / rate * 1e3
        name = f"prefill_{n // 1024}k" if n >= 1024 else f"prefill_{n}"
        record(
            name,
            ms,
            "ms",
            floor_ms,
            floor_ms / ms,
            COMMAND,
            tflops=round(prefill_flops(config, n, model) / ms / 1e9, 1),
        )
        pool = runner = None
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kv-dtype", default="int8")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--prefill", action="store_true")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--contexts", default=None, help="decode contexts (default 1024,8192; --sweep: 1024)")
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--sweep", default=None, help="A/B a kernel setting at 1k context: MODULE.ATTR=V1,V2,...")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("model_bench needs a GPU")
    copies, rate = copy_bandwidth_samples(), matmul_rate()
    bw = statistics.median(copies)
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (median of {len(copies)} buffer pairs: "
          f"{min(copies) / 1e12:.3f}-{max(copies) / 1e12:.3f}), bf16 matmul {rate / 1e12:.0f} TFLOP/s")  # fmt: skip
    if args.decode or args.prefill:  # a sweep alone writes no records: these are the floors of the records written
        record("copy_bandwidth", bw / 1e9, "GB/s", bw / 1e9, 1.0, COMMAND,
               samples_gbs=[round(c / 1e9, 1) for c in copies])  # fmt: skip
        record("matmul_rate_bf16", rate / 1e12, "TFLOP/s", rate / 1e12, 1.0, COMMAND)
    model = load_model(args.model, torch.bfloat16, "cuda")
    config = model.config
    spec = parse_kv_dtype(args.kv_dtype, torch.bfloat16)
    with torch.cuda.stream(torch.cuda.Stream()):
        if args.prefill:
            prefill_bench(model, config, spec, rate, [int(n) for n in args.lengths.split(",")], args.block_size)
        if args.sweep:
            batches = [int(b) for b in args.batches.split(",")]
            contexts = [int(c) for c in (args.contexts or "1024").split(",")]
            setting_sweep(model, config, spec, bw, batches, args.sweep, args.block_size, contexts)
        if args.decode:
            batches = [int(b) for b in args.batches.split(",")]
            contexts = [int(c) for c in (args.contexts or "1024,8192").split(",")]
            decode_bench(model, config, spec, bw, batches, contexts, args.block_size)
    write_benchmarks_md()


if __name__ == "__main__":
    main()
