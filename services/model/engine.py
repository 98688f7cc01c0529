"""The offline engine behind `kvrelay run`: batched prefill, then continuous decode steps, in one process.

The services reuse its pieces (loader, pool, runner, sampler); this loop is also the reference the end-to-end tests
compare the gateway -> prefill -> decode path against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from kvrelay.model_config import DTYPES, ModelConfig
from kvrelay.sampling import SamplingParams
from kvstore.allocator import BlockAllocator
from kvstore.block_table import blocks_needed
from kvstore.formats import KVSpec, parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry
from services.model.loader import build_model, load_weights
from services.model.runner import ModelRunner, SeqChunk
from services.model.sampler import Sampler, finish_reason, make_generator
from services.scheduler import PromptProgress, fits_context, pack_prefill


class PromptTooLongError(ValueError):
    pass


class Allocator(Protocol):
    """The block allocation the engine's loops rely on (kvstore/allocator.py's BlockAllocator): all or nothing, an
    allocation that cannot be met raises OutOfBlocks and takes no block."""

    def allocate(self, n: int) -> list[int]: ...

    def free(self, block_ids: Iterable[int]) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    dtype: str = "auto"  # auto: the checkpoint's dtype on a GPU, float32 on the CPU (bf16 matmuls are slow there)
    kv_dtype: str = "auto"
    block_size: int = 16
    num_blocks: int | None = None  # None: sized for the requests given to generate()
    max_batch_tokens: int = 2048  # prefill token budget per forward pass
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    device: str | None = None
    block_shuffle_seed: int | None = None  # tests: hand out block ids in random order


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        return getattr(torch, config.torch_dtype) if config.torch_dtype in DTYPES else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


class Engine:
    def __init__(self, cfg: EngineConfig, progress: bool = True) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_config = ModelConfig.from_dir(cfg.model_dir)
        self.dtype = resolve_dtype(cfg.dtype, self.model_config, self.device)
        self.kv_spec: KVSpec = parse_kv_dtype(cfg.kv_dtype, self.dtype)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = min(cfg.max_model_len or limit, limit, self.model_config.sliding_window or limit)
        weights = load_weights(cfg.model_dir, self.model_config, self.dtype, self.device, progress)
        self.model = build_model(self.model_config, weights, self.max_model_len)
        self.sampler = Sampler()
        self.pool: KVPool | None = None
        self.allocator: BlockAllocator | None = None

    def set_kv_dtype(self, kv_dtype: str, fp8: torch.dtype | None = None) -> None:
        """Switch the KV format: the pool is rebuilt on next use, the weights stay (quality benchmarks). fp8: the e4m3
        flavour of fp8 K/V (`KVPool.allocate`), default this platform's: the MI300X's e4m3fnuz measured on the CPU."""
        self.kv_spec = parse_kv_dtype(kv_dtype, self.dtype)
        self.kv_fp8 = fp8
        self.pool = None

    def _ensure_pool(self, num_blocks: int) -> None:
        if self.pool is not None and self.pool.geometry.num_blocks >= num_blocks:
            return
        c = self.model_config
        geometry = PoolGeometry(c.num_layers, num_blocks, self.cfg.block_size, c.num_kv_heads, c.head_dim)
        self.pool = KVPool.allocate(geometry, self.kv_spec, self.device, getattr(self, "kv_fp8", None))
        self.allocator = BlockAllocator(num_blocks, shuffle_seed=self.cfg.block_shuffle_seed)
        self.runner = ModelRunner(self.model, self.pool)

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise PromptTooLongError("empty prompt")
        if not fits_context(len(prompt), self.max_model_len):
            raise PromptTooLongError(
                f"prompt has {len(prompt)} tokens; the context is {self.max_model_len} (room for at least one more)"
            )
        bad = [t for t in prompt if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary (0..{self.model_config.vocab_size - 1}): {bad[:5]}")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], eos_token_ids=None
    ) -> list[GenerationResult]:
        params = params if isinstance(params, list) else [params] * len(prompts)
        for prompt in prompts:
            self.check_prompt(prompt)
        eos = tuple(self.model_config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        bs = self.cfg.block_size
        budgets = [min(len(p) + sp.max_tokens, self.max_model_len) for p, sp in zip(prompts, params, strict=True)]
        self._ensure_pool(self.cfg.num_blocks or sum(blocks_needed(n, bs) for n in budgets))
        results = [GenerationResult(list(p)) for p in prompts]
        generators = [make_generator(sp.seed) for sp in params]
        tables: list[list[int]] = [[] for _ in prompts]
        try:
            self._prefill(prompts, params, generators, tables, results, eos)
            running = [i for i, r in enumerate(results) if r.finish_reason is None]
            while running:
                for i in running:  # room for the token this step writes
                    need = blocks_needed(len(prompts[i]) + len(results[i].token_ids), bs) - len(tables[i])
                    tables[i] += self.allocator.allocate(need) if need > 0 else []
                chunks = [
                    SeqChunk(
                        (results[i].token_ids[-1],), len(prompts[i]) + len(results[i].token_ids) - 1, tuple(tables[i])
                    )
                    for i in running
                ]
                logits = self.runner.forward(chunks)
                self._sample(running, logits, prompts, params, generators, results, eos)
                for i in running:
                    if results[i].finish_reason is not None:
                        self.allocator.free(tables[i])
                        tables[i] = []
                running = [i for i in running if results[i].finish_reason is None]
        finally:
            for table in tables:
                if table:
                    self.allocator.free(table)
        return results

    def _prefill(self, prompts, params, generators, tables, results, eos) -> None:
        """Varlen batches up to the token budget; a prompt larger than the budget is split into chunks."""
        progress = [0] * len(prompts)
        pending = list(range(len(prompts)))
        while pending:
            batch, chunks = prefill_batch(
                prompts, progress, tables, pending, self.allocator, self.cfg.block_size, self.cfg.max_batch_tokens
            )
            logits = self.runner.forward(chunks)
            done = [j for j, i in enumerate(batch) if progress[i] == len(prompts[i])]
            self._sample([batch[j] for j in done], logits[done], prompts, params, generators, results, eos)
            for i in batch:
                if results[i].finish_reason is not None:
                    self.allocator.free(tables[i])
                    tables[i] = []
            pending = [i for i in pending if progress[i] < len(prompts[i])]

    def _sample(self, rows, logits, prompts, params, generators, results, eos) -> None:
        if not rows:
            return
        history = [prompts[i] + results[i].token_ids for i in rows]
        out = self.sampler(logits, [params[i] for i in rows], [generators[i] for i in rows], history)
        for j, i in enumerate(rows):
            r, sp = results[i], params[i]
            token = out.token_ids[j]
            r.token_ids.append(token)
            r.logprobs.append(out.logprobs[j])
            r.top_logprobs.append(out.top_logprobs[j])
            full = len(prompts[i]) + len(r.token_ids) >= self.max_model_len
            r.finish_reason = finish_reason(token, len(r.token_ids), sp, eos, full)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [num_tokens, vocab] of one sequence through the paged pool (quality benchmarks)."""
        self.check_prompt(token_ids)
        bs = self.cfg.block_size
        self._ensure_pool(self.cfg.num_blocks or blocks_needed(len(token_ids), bs))
        table = self.allocator.allocate(blocks_needed(len(token_ids), bs))
        try:
            out = []
            for start in range(0, len(token_ids), self.cfg.max_batch_tokens):
                piece = tuple(token_ids[start : start + self.cfg.max_batch_tokens])
                out.append(self.runner.forward([SeqChunk(piece, start, tuple(table))], all_logits=True))
            return torch.cat(out)
        finally:
            self.allocator.free(table)


def prefill_batch(
    prompts: list[list[int]],
    progress: list[int],
    tables: list[list[int]],
    pending: list[int],
    allocator: Allocator,
    block_size: int,
    max_batch_tokens: int,
) -> tuple[list[int], list[SeqChunk]]:
    """The engine's next prefill pass over the `pending` prompts (indices into `prompts`, in order), packed by the
    scheduler: the prompts it takes and their chunks. Grows each taken prompt's block table to cover its chunk (blocks
    come as chunks need them, not all at admission: the engine's pool is sized for every request it was given) and
    advances `progress` past the chunk.
    """
    plan = pack_prefill([PromptProgress(len(prompts[i]), progress[i]) for i in pending], max_batch_tokens)
    batch, chunks = [], []
    for chunk in plan:
        i = pending[chunk.index]
        need = blocks_needed(chunk.end, block_size) - len(tables[i])
        tables[i] += allocator.allocate(need) if need > 0 else []
        chunks.append(SeqChunk(tuple(prompts[i][chunk.start : chunk.end]), chunk.start, tuple(tables[i])))
        batch.append(i)
        progress[i] = chunk.end
    return batch, chunks
