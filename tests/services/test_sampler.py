"""Sampler tests: HF's logits processors are the reference for every mask; statistics for the draws themselves."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvrelay.sampling import SamplingParams
from services.model.sampler import (
    SampleOutput,
    Sampler,
    apply_repetition_penalty,
    finish_reason,
    is_stop,
    make_generator,
    position_seed,
    warp_logits,
)

VOCAB = 1013  # odd on purpose


def _logits(num_seqs: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _run(logits: torch.Tensor, params: list[SamplingParams], prev=None) -> SampleOutput:
    generators = [make_generator(p.seed) for p in params]
    prev = prev if prev is not None else [[] for _ in params]
    return Sampler()(logits, params, generators, prev)


def _hf_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The same chain HF generate() builds, one row at a time with scalar settings."""
    scores = row.unsqueeze(0).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores.squeeze(0)


# ---- greedy -------------------------------------------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    logits = _logits(7)
    out = _run(logits, [SamplingParams(temperature=0.0)] * 7)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()


def test_greedy_ties_go_to_lowest_id() -> None:
    logits = torch.zeros(2, 10)
    logits[0, [3, 7]] = 5.0
    logits[1, [9, 2, 4]] = 1.0
    assert _run(logits, [SamplingParams(temperature=0.0)] * 2).token_ids == [3, 2]


def test_greedy_accepts_bf16_and_leaves_input_untouched() -> None:
    logits = _logits(4).to(torch.bfloat16)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.8, top_k=5)] * 2
    out = _run(logits, params, prev=[[1, 2, 3]] * 4)
    assert torch.equal(logits, before)
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("params", [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0)])
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(64, seed=1)
    assert _run(logits, [params] * 64).token_ids == torch.argmax(logits, dim=-1).tolist()


def test_tiny_temperature_is_greedy() -> None:
    logits = _logits(16, seed=2)
    assert _run(logits, [SamplingParams(temperature=1e-7)] * 16).token_ids == logits.argmax(-1).tolist()


# ---- masks against references -------------------------------------------------------------------------------------

MIXED = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=50),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_k=100, top_p=0.95, min_p=0.1),
    SamplingParams(temperature=2.0, top_k=-1, top_p=0.5),
    SamplingParams(temperature=1.0, top_k=VOCAB + 5),
    SamplingParams(temperature=1.0, top_p=0.3),
]


def test_warp_matches_hf_per_row() -> None:
    logits = _logits(len(MIXED), seed=3)
    ours = warp_logits(logits.clone(), MIXED)
    for i, p in enumerate(MIXED):
        assert torch.equal(ours[i], _hf_warp(logits[i], p)), f"row {i}: {p}"


def _numpy_nucleus(row: np.ndarray, top_p: float) -> np.ndarray:
    """Independent reference: keep the fewest most likely tokens whose total probability reaches top_p."""
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep_count = int(np.searchsorted(cumulative, top_p - 1e-9)) + 1  # first index where the mass reaches top_p
    keep = np.zeros(row.shape, dtype=bool)
    keep[order[:keep_count]] = True
    return keep


def _numpy_top_k(row: np.ndarray, k: int) -> np.ndarray:
    return row >= np.sort(row)[::-1][k - 1]


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.7, 0.95])
@pytest.mark.parametrize("top_k", [0, 3, 40])
def test_top_k_top_p_masks_match_numpy(top_k: int, top_p: float) -> None:
    logits = _logits(5, seed=4)
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)] * 5
    kept = torch.isfinite(warp_logits(logits.clone(), params)).numpy()
    for i in range(5):
        row = logits[i].double().numpy()
        if top_k > 0:
            row = np.where(_numpy_top_k(row, top_k), row, -np.inf)
        np.testing.assert_array_equal(kept[i], _numpy_nucleus(row, top_p) & np.isfinite(row))


def test_min_p_mask_matches_definition() -> None:
    logits = _logits(3, seed=5)
    params = [SamplingParams(temperature=1.0, min_p=m) for m in (0.01, 0.1, 0.5)]
    kept = torch.isfinite(warp_logits(logits.clone(), params))
    probs = logits.double().softmax(-1)
    for i, p in enumerate(params):
        expected = probs[i] >= p.min_p * probs[i].max()
        assert torch.equal(kept[i], expected)


def test_repetition_penalty_matches_hf() -> None:
    logits = _logits(4, seed=6)
    prev = [[5, 17, 17, 900, 3], [], [0, 1, 2, VOCAB - 1, VOCAB + 10], [42] * 8]
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 1.5, 0.7, 1.0)]
    ours = apply_repetition_penalty(logits.clone(), params, prev)
    for i, p in enumerate(params):
        if prev[i] and p.repetition_penalty != 1.0:
            ids = torch.tensor([prev[i]], dtype=torch.long)
            expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[i : i + 1].clone())[0]
        else:
            expected = logits[i]
        assert torch.equal(ours[i], expected), f"row {i}"


def test_repetition_penalty_steers_greedy() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.05]])
    assert _run(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.2)], prev=[[0]]).token_ids == [1]
    logits = torch.tensor([[-1.0, -1.1, -5.0]])
    assert _run(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.2)], prev=[[0]]).token_ids == [1]


# ---- the draws ----------------------------------------------------------------------------------------------------

DRAWS = 20_000


def _histogram(logits_row: torch.Tensor, params: SamplingParams) -> np.ndarray:
    out = _run(logits_row.expand(DRAWS, -1).contiguous(), [params] * DRAWS)
    return np.bincount(out.token_ids, minlength=logits_row.shape[0]) / DRAWS


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.7),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
        SamplingParams(temperature=1.0, min_p=0.2),
    ],
)
def test_empirical_distribution_matches_warped_softmax(params: SamplingParams) -> None:
    torch.manual_seed(1234)
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.3, 1.2, -3.0])
    expected = _hf_warp(row, params).softmax(-1).numpy()
    observed = _histogram(row, params)
    # Standard error of a frequency is at most 0.5/sqrt(20k) = 0.0035; allow ~4.5 of them.
    assert np.abs(observed - expected).max() < 0.016, (observed, expected)
    # Removed tokens are never drawn.
    assert observed[expected == 0].sum() == 0


def test_min_p_never_draws_below_threshold() -> None:
    torch.manual_seed(7)
    row = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.09, 0.05, 0.03, 0.02, 0.01]))
    params = SamplingParams(temperature=1.0, min_p=0.2)  # threshold 0.08: tokens 4.. go
    observed = _histogram(row, params)
    assert observed[4:].sum() == 0
    assert (observed[:4] > 0).all()


# ---- seeds --------------------------------------------------------------------------------------------------------


PROMPT_LEN = 5  # the first sampled token is at this position


def _decode_steps(
    batch: list[SamplingParams], steps: int, logits_seed: int, start: int = 0, fresh: bool = False
) -> list[list[int]]:
    """Per row, the tokens of steps start..steps-1; each row sees the same logits every step whatever its batch
    position. fresh: new generators every step (a worker that just took the session over), else one per row."""
    generators = [make_generator(p.seed) for p in batch]
    sampler = Sampler()
    rows_by_seed = {p.seed: _logits(1, seed=logits_seed + (p.seed or 0) % 97)[0] for p in batch}
    tokens: list[list[int]] = [[] for _ in batch]
    for step in range(start, steps):
        if fresh:
            generators = [make_generator(p.seed) for p in batch]
        logits = torch.stack([rows_by_seed[p.seed] + 0.01 * step for p in batch])
        history = [[0] * (PROMPT_LEN + step) for _ in batch]  # only its length matters: the position
        out = sampler(logits, batch, generators, history)
        for i, t in enumerate(out.token_ids):
            tokens[i].append(t)
    return tokens


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    target = SamplingParams(temperature=1.0, top_k=200, top_p=0.95, seed=2024)
    alone = _decode_steps([target], steps=12, logits_seed=10)[0]

    others = [
        SamplingParams(temperature=0.9, seed=7),
        SamplingParams(temperature=1.0),  # global RNG
        SamplingParams(temperature=0.0, seed=99),  # greedy
        SamplingParams(temperature=1.2, min_p=0.05, seed=-5),
    ]
    batch_a = [others[0], target, others[1], others[2], others[3]]
    batch_b = [others[3], others[2], others[1], others[0], target]
    assert _decode_steps(batch_a, steps=12, logits_seed=10)[1] == alone
    assert _decode_steps(batch_b, steps=12, logits_seed=10)[4] == alone

    different = dataclasses.replace(target, seed=2025)
    assert _decode_steps([different], steps=12, logits_seed=10)[0] != alone


def test_seeded_draws_are_a_function_of_seed_and_position() -> None:
    """What a resumed stream relies on: a worker that picks a request up at step k, with generators it just made,
    samples what the uninterrupted run sampled from step k on; the position, not the generator's past, decides."""
    batch = [SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=0.8, top_p=0.9, seed=-3)]
    whole = _decode_steps(batch, steps=12, logits_seed=20)
    for k in (1, 5, 11):
        resumed = _decode_steps(batch, steps=12, logits_seed=20, start=k, fresh=True)
        assert [row[k:] for row in whole] == resumed
    # explicit positions (the decode loop's, a step ahead of the host) equal the ones derived from the history
    logits = _logits(2, seed=21)
    implied = Sampler()(logits, batch, [make_generator(p.seed) for p in batch], [[0] * 9, [0] * 9]).token_ids
    explicit = Sampler()(logits, batch, [make_generator(p.seed) for p in batch], [[], []], positions=[9, 9])
    assert explicit.token_ids == implied


def test_positions_draw_different_streams_and_unseeded_rows_stay_random() -> None:
    assert len({position_seed(7, p) for p in range(1000)}) == 1000
    assert position_seed(7, 3) == position_seed(7 + (1 << 64), 3) != position_seed(8, 3)
    logits = torch.zeros(64, VOCAB)  # uniform: every row is a fair draw
    seeded = [SamplingParams(temperature=1.0, seed=5)] * 64
    rows = Sampler()(logits, seeded, [make_generator(5) for _ in seeded], [[0] * p for p in range(64)])
    assert len(set(rows.token_ids)) > 32  # the positions of one request do not repeat one draw
    unseeded = [SamplingParams(temperature=1.0)] * 64
    a = Sampler()(logits, unseeded, [None] * 64, [[0]] * 64).token_ids
    b = Sampler()(logits, unseeded, [None] * 64, [[0]] * 64).token_ids
    assert a != b


def test_seed_does_not_depend_on_global_rng() -> None:
    params = [SamplingParams(temperature=1.0, seed=3)] * 3
    logits = _logits(3, seed=8)
    torch.manual_seed(0)
    first = _run(logits, params).token_ids
    torch.manual_seed(1)
    assert _run(logits, params).token_ids == first


def test_make_generator() -> None:
    assert make_generator(None) is None
    # Out-of-range seeds wrap instead of failing.
    assert make_generator(-1) is not None and make_generator(1 << 70) is not None
    a = torch.rand(4, generator=make_generator(5))
    assert torch.equal(a, torch.rand(4, generator=make_generator(5)))


# ---- logprobs -----------------------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(5, seed=9)
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.7, top_k=10, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=None),
        SamplingParams(temperature=1.5, repetition_penalty=1.4, logprobs=20),
        SamplingParams(temperature=0.0, logprobs=1),
    ]
    out = _run(logits, params, prev=[[1, 2]] * 5)
    raw = torch.log_softmax(logits.double(), dim=-1)
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert out.logprobs[i] is None and out.top_logprobs[i] is None
            continue
        assert out.logprobs[i] == pytest.approx(raw[i, out.token_ids[i]].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert len(top) == p.logprobs
        assert [t for t, _ in top] == raw[i].topk(p.logprobs).indices.tolist()
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(raw[i].topk(p.logprobs).values.tolist(), abs=1e-5)
    # Greedy rows: the chosen token is the top-1 alternative.
    assert out.top_logprobs[0][0][0] == out.token_ids[0]


def test_no_logprobs_requested() -> None:
    out = _run(_logits(2), [SamplingParams()] * 2)
    assert out.logprobs == [None, None] and out.top_logprobs == [None, None]


def test_empty_batch_and_mismatch() -> None:
    assert _run(torch.empty(0, 10), []).token_ids == []
    with pytest.raises(ValueError, match="batch mismatch"):
        Sampler()(_logits(2), [SamplingParams()], [None], [[]])


# ---- stopping -----------------------------------------------------------------------------------------------------


def test_is_stop_and_finish_reason() -> None:
    eos = {2}
    plain = SamplingParams(stop_token_ids=(7,), max_tokens=3)
    ignore = SamplingParams(stop_token_ids=[7], ignore_eos=True, max_tokens=3)
    assert is_stop(2, plain, eos) and is_stop(7, plain, eos) and not is_stop(5, plain, eos)
    assert not is_stop(2, ignore, eos) and is_stop(7, ignore, eos)
    assert finish_reason(5, 1, plain, eos) is None
    assert finish_reason(5, 3, plain, eos) == "length"
    assert finish_reason(2, 3, plain, eos) == "stop"
    assert finish_reason(2, 2, ignore, eos) is None


# ---- params -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop_token_ids", (1, -2)),
        ("seed", 1.5),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_defaults_coercion_and_pickle() -> None:
    p = SamplingParams(stop_token_ids=[3, 4], seed=11, logprobs=0, top_k=-1)
    assert p.stop_token_ids == (3, 4)
    assert pickle.loads(pickle.dumps(p)) == p
    assert hash(p) == hash(dataclasses.replace(p))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    d = SamplingParams()
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    assert (d.seed, d.max_tokens, d.stop_token_ids, d.ignore_eos, d.logprobs) == (None, 256, (), False, None)
    assert SamplingParams(temperature=0).is_greedy and not d.is_greedy
