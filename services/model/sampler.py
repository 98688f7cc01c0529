"""Batched sampling: one call turns a batch's last-position logits into one token per sequence.

`Sampler.launch` queues the device work and returns a `PendingSample`; its `result()` is the step's one host sync.
The decode worker launches its next step between the two; calling the Sampler does both at once.

Order of operations, the same as HF `generate` so its logits processors serve as the test reference:
repetition penalty -> (greedy rows: argmax) -> temperature -> top-k -> top-p -> min-p -> sample.

Logprobs follow vLLM's default: they come from the model's raw distribution, `log_softmax(logits)` before the penalty,
temperature and filtering. Those are the numbers that mean something to a client (a perplexity, a classifier score)
and they do not change with the sampling settings; the cost is that a sampled token's logprob can be lower than any
in its top-n list, and a token that top-k removed still has a finite logprob.

Sampling is an exponential race: argmax(p / q) with q ~ Exp(1) per token draws exactly from p, needs no sort or cumsum,
and lets every seeded row fill its own q from its own generator. That is what makes a seed reproducible whatever else
shares the batch: a seeded row draws its `vocab_size` values from its own generator, and nothing else touches it.

A seeded row's randomness is a function of (seed, position) only, position being the index in the sequence (prompt
included) of the token it samples: before each draw the row's generator is seeded afresh from that pair
(`position_seed`). Nothing carries over from one step to the next, so a worker that takes over a session after
another died, or the decode worker after prefill, draws what an uninterrupted run would have drawn. Unseeded rows
draw from the process-wide RNG and stay random.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from kvrelay.sampling import SamplingParams
from services.model.transfer import to_device, to_host

# 2**64: torch.Generator.manual_seed takes an unsigned 64-bit seed; a client's negative or larger seed wraps into it.
_SEED_MODULUS = 1 << 64


@dataclass(frozen=True)
class SampleOutput:
    token_ids: list[int]  # [num_seqs]
    # Raw-distribution logprob of each chosen token; None for rows whose params.logprobs is None.
    logprobs: list[float | None]
    # (token_id, logprob) of the params.logprobs most likely tokens, most likely first; None as above, [] for 0.
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """One generator per seeded request, kept for the request's life only to save making one per step: the sampler
    seeds it from (seed, position) before every draw, so its state never carries anything from step to step.

    `device` must be the device the logits live on: torch draws on the generator's device.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % _SEED_MODULUS)
    return generator


def position_seed(seed: int, position: int) -> int:
    """The generator seed of the draw for the token at `position` of a request seeded with `seed`: splitmix64's
    finalizer over the seed mixed with the position (a bijection of 64-bit words, so the positions of one request
    never share a stream), the same in every process."""
    mask = _SEED_MODULUS - 1
    x = (seed % _SEED_MODULUS) ^ (((position + 1) * 0x9E3779B97F4A7C15) & mask)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def is_stop(token_id: int, params: SamplingParams, eos_token_ids: Collection[int]) -> bool:
    """True when `token_id` ends the request: one of its stop_token_ids, or EOS unless it asked to ignore EOS."""
    if token_id in params.stop_token_ids:
        return True
    return not params.ignore_eos and token_id in eos_token_ids


def finish_reason(
    token_id: int,
    num_output_tokens: int,
    params: SamplingParams,
    eos_token_ids: Collection[int],
    context_full: bool = False,
) -> str | None:
    """OpenAI's finish_reason after appending `token_id` as output token number `num_output_tokens` (1-based);
    context_full: the sequence reached the model's context, which ends it like max_tokens does.

    A stop token wins over the length limit when both happen on the same token: the client asked to stop there anyway.
    """
    if is_stop(token_id, params, eos_token_ids):
        return "stop"
    if num_output_tokens >= params.max_tokens or context_full:
        return "length"
    return None


class PendingSample:
    """A batch's sampling, launched: the device work is queued and the results are on their way to the host.

    `token_ids` stays on the device, so the next decode step can take it as input before the host has seen it;
    result() waits for the copies (the one host sync of a step) and returns the SampleOutput.
    """

    def __init__(
        self,
        token_ids: torch.Tensor,  # [num_seqs] int64, on the logits' device
        logprob_rows: list[int],  # rows that asked for logprobs
        top_n: list[int],  # [len(logprob_rows)]: how many top entries each of those rows wants
        chosen: torch.Tensor | None = None,  # [len(logprob_rows)] float32: logprob of each chosen token
        top_values: torch.Tensor | None = None,  # [len(logprob_rows), max(top_n)] float32, descending
        top_ids: torch.Tensor | None = None,  # [len(logprob_rows), max(top_n)] int64
    ) -> None:
        self.token_ids = token_ids
        self.logprob_rows, self.top_n = logprob_rows, top_n
        device = token_ids.device
        # Copied to pinned host memory on the stream, so waiting for them does not wait for work queued later (the
        # next step); a blocking .tolist() here would.
        self._host = [to_host(t) for t in (token_ids, chosen, top_values, top_ids)]
        self._ready = None
        if device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self) -> SampleOutput:
        if self._ready is not None:
            self._ready.synchronize()
        token_ids, chosen, top_values, top_ids = (None if t is None else t.tolist() for t in self._host)
        num_seqs = len(token_ids)
        logprobs: list[float | None] = [None] * num_seqs
        top: list[list[tuple[int, float]] | None] = [None] * num_seqs
        for j, i in enumerate(self.logprob_rows):
            n = self.top_n[j]
            logprobs[i] = chosen[j]
            top[i] = list(zip(top_ids[j][:n], top_values[j][:n], strict=True)) if n else []
        return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top)


class Sampler:
    """Stateless; per-request state (the generators) is owned by the caller, so rows can join and leave the batch."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prev_token_ids: Sequence[Sequence[int]],
        positions: Sequence[int] | None = None,
    ) -> SampleOutput:
        return self.launch(logits, params, generators, prev_token_ids, positions).result()

    def launch(
        self,
        logits: torch.Tensor,  # [num_seqs, vocab_size], any float dtype; not modified
        params: Sequence[SamplingParams],  # [num_seqs]
        generators: Sequence[torch.Generator | None],  # [num_seqs]; from make_generator(params[i].seed)
        prev_token_ids: Sequence[Sequence[int]],  # [num_seqs][prompt + output so far]; read for penalty rows
        # [num_seqs]: index in its sequence of the token each row samples, which seeds a seeded row's draw; None:
        # len(prev_token_ids[i]) (the decode loop passes it when the host is a step behind the device)
        positions: Sequence[int] | None = None,
    ) -> PendingSample:
        """Queues the whole sampling on the logits' device and returns without waiting for it.

        Everything is read from `logits` before this returns (in stream order), so a CUDA graph's static output
        may be overwritten by the next replay right after.
        """
        num_seqs, vocab_size = logits.shape
        if not (len(params) == len(generators) == len(prev_token_ids) == num_seqs):
            raise ValueError(
                f"batch mismatch: {num_seqs} logits rows, {len(params)} params, {len(generators)} generators, "
                f"{len(prev_token_ids)} prev_token_ids"
            )
        device = logits.device
        if num_seqs == 0:
            return PendingSample(torch.empty(0, dtype=torch.int64, device=device), [], [])

        # float32 for the maths (bf16 softmax/cumsum lose the tail); copy=True because everything below is in place.
        processed = logits.to(torch.float32, copy=True)
        processed = apply_repetition_penalty(processed, params, prev_token_ids)

        # Greedy is plain argmax of the penalized logits (torch returns the first maximum: ties go to the lowest id).
        # Taken for every row because it is cheap; sampled rows overwrite theirs below.
        token_ids = processed.argmax(dim=-1)  # [num_seqs]

        sample_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if positions is None:
            positions = [len(prev) for prev in prev_token_ids]
        if len(sample_rows) == num_seqs:
            token_ids = _sample(processed, params, generators, positions)
        elif sample_rows:
            row_index = to_device(sample_rows, torch.long, device)
            token_ids[row_index] = _sample(
                processed[row_index],  # a copy, rows in sample_rows order
                [params[i] for i in sample_rows],
                [generators[i] for i in sample_rows],
                [positions[i] for i in sample_rows],
            )
        return _launch_logprobs(logits, token_ids, params)


def apply_repetition_penalty(
    logits: torch.Tensor, params: Sequence[SamplingParams], prev_token_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor over the batch: every token seen once or more is penalized once."""
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not rows:
        return logits
    num_seqs, vocab_size = logits.shape
    row_index: list[int] = []
    token_index: list[int] = []
    for i in rows:
        # Ids past the logits' width (an embedding larger than the lm_head) can never be sampled; HF drops them too.
        ids = [t for t in prev_token_ids[i] if t < vocab_size]
        row_index.extend([i] * len(ids))
        token_index.extend(ids)
    seen = torch.zeros(num_seqs, vocab_size, dtype=torch.bool, device=logits.device)
    seen[
        to_device(row_index, torch.long, logits.device),
        to_device(token_index, torch.long, logits.device),
    ] = True
    # Rows without a penalty get 1.0, for which both branches are exact identities.
    penalty = to_device([p.repetition_penalty for p in params], torch.float32, logits.device)
    penalty = penalty.unsqueeze(1)  # [num_seqs, 1]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def warp_logits(
    logits: torch.Tensor,  # [n, vocab_size] float32, already penalized; modified in place
    params: Sequence[SamplingParams],  # [n]; none greedy (temperature 0 would divide by zero)
) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p: the logits of the distribution a sampled row draws from (-inf = removed)."""
    device = logits.device
    vocab_size = logits.shape[1]
    temperature = to_device([p.temperature for p in params], torch.float32, device)
    logits.div_(temperature.unsqueeze(1))

    # Skipped unless some row needs it: the sort over the vocabulary is the most expensive step here.
    if any(0 < p.top_k < vocab_size for p in params) or any(p.top_p < 1.0 for p in params):
        logits = _apply_top_k_top_p(logits, params)

    if any(p.min_p > 0.0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, device).unsqueeze(1)
        probs = logits.softmax(dim=-1)
        # The most likely token always survives: its probability is never below min_p (<= 1) times itself.
        logits.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def _sample(
    logits: torch.Tensor,  # [n, vocab_size] float32, penalized; modified in place
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    positions: Sequence[int],
) -> torch.Tensor:
    probs = warp_logits(logits, params).softmax(dim=-1)  # [n, vocab_size]
    q = torch.empty_like(probs)
    if any(g is None for g in generators):
        q.exponential_()  # one batched draw from the global RNG; seeded rows are overwritten below
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        # A host-side seed and offset, captured by the kernel at launch: re-seeding for the next step never races
        # with this one on the device.
        if params[row].seed is not None:
            generator.manual_seed(position_seed(params[row].seed, positions[row]))
        if generator.device == q.device:
            q[row].exponential_(generator=generator)
        else:
            # A CPU generator with GPU logits: still correct and reproducible, but a host draw and a copy per row and
            # step; make_generator(seed, logits.device) avoids it.
            q[row].copy_(torch.empty(q.shape[1], device=generator.device).exponential_(generator=generator))
    # exponential_ can return exactly 0 (u = 0); 0/0 would be NaN and argmax picks NaN, i.e. a masked-out token.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k then top-p with a single sort, per-row k and p. Masks equal HF's TopK- then TopPLogitsWarper.

    Sorted ascending (like HF and vLLM) so top-p can compare the cumulative mass of the *least* likely tokens against
    1 - p: a token is dropped when everything at or below it together has no more than 1 - p of the mass.
    """
    device = logits.device
    vocab_size = logits.shape[1]
    # stable=True: ties keep id order, so the same logits give the same mask on every run.
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=False, stable=True)

    if any(0 < p.top_k < vocab_size for p in params):
        k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        # The k-th largest value; everything strictly below it goes (ties with it stay, as in HF).
        kth_position = to_device([vocab_size - x for x in k], torch.long, device).unsqueeze(1)
        kth_value = sorted_logits.gather(1, kth_position)
        sorted_logits.masked_fill_(sorted_logits < kth_value, float("-inf"))

    if any(p.top_p < 1.0 for p in params):
        # 1 - p computed in Python (float64) then rounded, as HF does; -1 turns top-p off for a row (a cumsum is >= 0).
        threshold = [1.0 - p.top_p if p.top_p < 1.0 else -1.0 for p in params]
        threshold_t = to_device(threshold, torch.float32, device).unsqueeze(1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= threshold_t
        drop[:, -1] = False  # the most likely token always stays, however small p is
        sorted_logits.masked_fill_(drop, float("-inf"))

    return logits.scatter_(1, sorted_index, sorted_logits)


def _launch_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]) -> PendingSample:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return PendingSample(token_ids, [], [])
    vocab_size = logits.shape[1]
    row_index = to_device(rows, torch.long, logits.device)
    # The caller's logits, untouched by the penalty or temperature: see the module docstring.
    raw = torch.log_softmax(logits[row_index].float(), dim=-1)  # [len(rows), vocab_size]
    chosen = raw.gather(1, token_ids[row_index].unsqueeze(1)).squeeze(1)
    top_n = [min(params[i].logprobs or 0, vocab_size) for i in rows]
    values = ids = None
    if max(top_n) > 0:
        values, ids = raw.topk(max(top_n), dim=-1, sorted=True)  # descending
    return PendingSample(token_ids, rows, top_n, chosen, values, ids)
