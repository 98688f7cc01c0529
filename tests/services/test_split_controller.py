"""The split controller against a simulated prefill/decode timing model, SLO admission's rule, and the mechanisms'
pure parts (pacing, CU masks with a fake HIP library, the decode ITL window)."""

from __future__ import annotations

import ctypes
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import pytest

from services.decode.step_loop import ItlWindow
from services.split.controller import (
    CREDIT_MAX_MS,
    DECODE_OVERLOAD,
    DWELL_S,
    GROW_AT,
    HEADROOM,
    ITL_BUDGET,
    LADDER,
    MEMORY_S,
    NEUTRAL,
    TICK_S,
    Observation,
    PauseCredit,
    PrefillRate,
    Slo,
    SplitController,
    refusal,
)
from services.split.mechanism import CuMaskGpu, CuMaskStreams, cu_mask, pacing_pause_s, prefill_gpu

SLO = Slo(ttft_ms=2000, itl_ms=20)


@dataclass
class Gpu:
    """A toy of one GPU shared by a prefill and a decode process: decode alone steps in `step_ms`; a running prefill
    slows it by `interference` at full duty, less as prefill's duty falls (measured on an H100 under MPS, 8B shape:
    ~6.5 ms alone, 15-17 ms beside an unpaced prefill); prefill computes `rate` tokens/s times its duty, at half speed
    beside a decode."""

    step_ms: float = 7.0
    interference: float = 1.3
    rate: float = 24000.0

    def decode_itl(self, split, prefill_busy: bool) -> float:
        return self.step_ms * (1 + self.interference * split.prefill_duty) if prefill_busy else self.step_ms

    def prefill_rate(self, split, decode_busy: bool) -> float:
        return self.rate * split.prefill_duty * (0.5 if decode_busy else 1.0)


def simulate(gpu: Gpu, arrivals_tokens_per_s: float, seconds: float, decode_busy=True, slo=SLO, level=NEUTRAL):
    """Feed the controller TICK_S by TICK_S: prefill's queue grows by the arrivals and shrinks at the rate the split
    gives it; decode's ITL follows the split. Returns [(t, level after deciding, itl seen, queue TTFT seen)]."""
    ctl = SplitController(slo, level)
    queue = 0.0
    trace = []
    t = 0.0
    while t < seconds:
        split = ctl.split
        rate = gpu.prefill_rate(split, decode_busy)
        queue = max(0.0, queue + (arrivals_tokens_per_s - rate) * TICK_S)
        itl = gpu.decode_itl(split, queue > 0) if decode_busy else None
        queue_ttft = queue / rate * 1e3 if rate else 0.0
        ctl.decide(Observation(t, itl, queue_ttft))
        trace.append((t, ctl.level, itl, queue_ttft))
        t += TICK_S
    return trace


def changes(trace) -> list[float]:
    return [t for (t, level, *_), (_, before, *_) in zip(trace[1:], trace, strict=False) if level != before]


def decide_once(level: int, itl: float | None, queue_ttft_ms: float) -> int:
    ctl = SplitController(SLO, level)
    ctl.decide(Observation(0.0, itl, queue_ttft_ms))
    return ctl.level


def test_each_move_follows_the_rule():
    budget = SLO.itl_ms * ITL_BUDGET  # 16 ms
    room = budget * HEADROOM  # 12.8 ms
    pressed = SLO.ttft_ms * GROW_AT + 1
    assert decide_once(NEUTRAL, budget + 0.1, 0.0) == NEUTRAL - 1  # decode over budget: prefill gives back
    assert decide_once(0, budget + 0.1, pressed) == 0  # nothing below the bottom rung, even with a queue
    assert decide_once(0, room - 0.1, 0.0) == 1  # decode has room again: hold back less
    assert decide_once(0, None, 0.0) == 1  # decode idle
    assert decide_once(0, budget - 0.1, pressed) == 1  # within budget and the queue's TTFT presses: grow
    assert decide_once(0, budget - 0.1, 0.0) == 0  # within budget, no room, nothing presses: stay
    assert decide_once(NEUTRAL, budget - 0.1, pressed) == NEUTRAL  # the top: prefill unpaced


def test_gives_back_until_decode_is_within_its_budget():
    # decode 11 ms alone, 25 ms beside an unpaced prefill: only a quarter duty keeps it under 16 ms
    trace = simulate(Gpu(step_ms=11.0), 14000, 30)
    budget = SLO.itl_ms * ITL_BUDGET
    for (_, before, *_), (_, after, itl, _) in zip(trace, trace[1:], strict=False):
        if itl > budget and after != before:
            assert after < before  # decode over budget when it decided: the only move is down
    # it settles at the bottom rung, trying the one above for the queue's sake once per MEMORY_S at most
    last = trace[-int(20 / TICK_S) :]
    over = sum(itl > budget for _, _, itl, _ in last)
    assert over <= (20 / MEMORY_S + 1) * DWELL_S / TICK_S, over
    assert sum(level == 0 for _, level, *_ in last) >= 0.8 * len(last)


def test_grows_back_when_the_queue_presses_and_decode_is_within_budget():
    # at a quarter duty decode is within budget (12.7 ms, no room below 12.8) and the queue grows past GROW_AT
    trace = simulate(Gpu(step_ms=10.0, interference=0.27), 14000, 20, level=0)
    first = next(t for t, level, *_ in trace if level > 0)
    ttft_then = next(q for t, _, _, q in trace if t == first)  # what the controller saw when it moved
    assert ttft_then > SLO.ttft_ms * GROW_AT
    assert trace[-1][1] == NEUTRAL


def test_never_changes_faster_than_the_dwell():
    # loads and decode speeds that sit at the edges: the controller may move, but never twice within DWELL_S
    for step_ms in (7.0, 9.0, 11.0):
        for arrivals in (9000, 12000, 14000, 20000):
            trace = simulate(Gpu(step_ms=step_ms), arrivals, 60, level=0)
            moves = changes(trace)
            assert all(b - a >= DWELL_S - 1e-9 for a, b in zip(moves, moves[1:], strict=False)), (arrivals, moves)


def test_idle_decode_leaves_prefill_unpaced():
    trace = simulate(Gpu(), 30000, 10, decode_busy=False)
    assert all(LADDER[level].prefill_duty == 1.0 for _, level, *_ in trace)


def test_itl_slo_off_never_paces_prefill():
    ctl = SplitController(Slo(ttft_ms=2000, itl_ms=0))
    for i in range(20):
        ctl.decide(Observation(i * TICK_S, 500.0, 1e9))
    assert ctl.level == NEUTRAL


# -- decode's pauses ---------------------------------------------------------------------------------------------------


def test_pause_credit_spends_slack_and_pays_it_back():
    credit = PauseCredit(budget_ms=16.0)
    assert credit.pause_ms(150.0) == 150.0  # idle worker: a whole pass
    assert credit.pause_ms(500.0) == CREDIT_MAX_MS  # never longer than the cap
    credit.step(6.0 + 150.0)  # the gap that held the pause
    assert credit.ms == pytest.approx(CREDIT_MAX_MS + 16.0 - 156.0)
    assert credit.pause_ms(150.0) == pytest.approx(60.0)  # only what is left
    for _ in range(6):
        credit.step(6.0)  # 10 ms of slack a step
    assert credit.ms == pytest.approx(120.0)
    for _ in range(100):
        credit.step(30.0)  # slower than budget without pausing: debt, bounded
    assert credit.ms == -CREDIT_MAX_MS and credit.pause_ms(100.0) == 0.0


def test_mean_itl_of_a_window_under_pauses_stays_near_the_budget():
    """Steps of 6.5 ms, a prefill always running with 150 ms passes: decode pauses whenever its credit allows, and the
    mean gap converges to the budget (prefill gets the rest of the time alone)."""
    budget = SLO.itl_ms * ITL_BUDGET
    credit = PauseCredit(budget)
    gaps = []
    for _ in range(2000):
        gap = 6.5 + credit.pause_ms(150.0)
        credit.step(gap)
        gaps.append(gap)
    mean = sum(gaps[-500:]) / 500
    assert budget * 0.95 <= mean <= budget * 1.05
    assert max(gaps) <= 6.5 + CREDIT_MAX_MS


# -- admission -------------------------------------------------------------------------------------------------------


def rate_of(tokens_per_s: float) -> PrefillRate:
    rate = PrefillRate()
    rate.observe(int(tokens_per_s), 1.0)
    return rate


def test_refuses_exactly_when_the_predicted_ttft_passes_the_slo():
    rate = rate_of(1000.0)  # 1 token a ms
    slo = Slo(ttft_ms=2000, itl_ms=20)
    assert refusal(1500, 500, rate, slo) is None  # 2000 ms: meets it
    why = refusal(1500, 501, rate, slo)  # 2001 ms: cannot
    assert why is not None and "2001 ms" in why and "2000 ms SLO" in why and "1500 prompt tokens queued" in why


def test_a_prompt_alone_or_before_any_measurement_is_admitted():
    slo = Slo(ttft_ms=100, itl_ms=20)
    assert refusal(0, 10**6, rate_of(10.0), slo) is None  # alone: refusing makes nobody faster
    assert refusal(10**6, 10**6, PrefillRate(), slo) is None  # no measurement yet
    assert refusal(10**6, 10**6, rate_of(10.0), Slo(ttft_ms=0, itl_ms=20)) is None  # SLO off


def test_prefill_rate_follows_the_measurements():
    rate = PrefillRate(weight=0.5)
    rate.observe(1000, 1.0)
    rate.observe(3000, 1.0)
    assert rate.tokens_per_s == pytest.approx(2000.0)
    rate.observe(0, 1.0)  # nothing computed: ignored
    assert rate.predict_ms(4000) == pytest.approx(2000.0)
    assert rate.predict_ms(4000, duty=0.5) == pytest.approx(4000.0)


# -- mechanisms ------------------------------------------------------------------------------------------------------


def test_pacing_gives_prefill_its_duty():
    assert pacing_pause_s(0.1, 1.0) == 0.0
    compute = 0.1
    for duty in (0.25, 0.5, 0.75):
        pause = pacing_pause_s(compute, duty)
        assert compute / (compute + pause) == pytest.approx(duty)


@pytest.mark.parametrize("num_cus", [1, 38, 64, 100, 304])
@pytest.mark.parametrize("share", [0.25, 0.5, 0.75, 1.0])
def test_cu_mask_enables_the_share_spread_over_the_device(num_cus, share):
    words = cu_mask(num_cus, share)
    bits = [(words[i // 32] >> (i % 32)) & 1 for i in range(num_cus)]
    assert len(words) == (num_cus + 31) // 32
    assert sum(bits) == max(1, int(share * num_cus + 1e-9))
    assert all(w >> 32 == 0 for w in words)
    assert not any(words[i // 32] >> (i % 32) & 1 for i in range(num_cus, 32 * len(words)))  # nothing past the CUs
    if share == 0.5 and num_cus >= 8:  # spread: every 8-CU block has its half, not all at one end
        assert all(sum(bits[i : i + 8]) == 4 for i in range(0, num_cus - 7, 8))


class FakeHip:
    """hipExtStreamCreateWithCUMask and hipStreamDestroy as the HIP runtime has them, recording what they get."""

    def __init__(self, fail: int = 0) -> None:
        self.created: dict[int, list[int]] = {}
        self.destroyed: list[int] = []
        self.fail = fail

    def hipExtStreamCreateWithCUMask(self, stream_ptr, count, array):  # noqa: N802
        if self.fail:
            return self.fail
        handle = 0x1000 + len(self.created)
        ctypes.cast(stream_ptr, ctypes.POINTER(ctypes.c_void_p))[0] = handle
        self.created[handle] = [array[i] for i in range(count)]
        return 0

    def hipStreamDestroy(self, stream):  # noqa: N802
        self.destroyed.append(stream.value)
        return 0


def test_cu_mask_streams_one_per_share_and_the_controller_picks_by_share():
    hip = FakeHip()
    shares = sorted({s.prefill_share for s in LADDER})  # 0.25, 0.5, 1.0
    streams = CuMaskStreams(304, shares, hip=hip)
    assert len(hip.created) == len(shares)
    for share in shares:
        assert hip.created[streams.handle_for(share)] == cu_mask(304, share)
    assert streams.handle_for(0.75) == streams.handle_for(0.5)  # the largest share not above
    assert streams.handle_for(0.1) == streams.handle_for(0.25)  # below all: the smallest
    streams.close()
    assert sorted(hip.destroyed) == sorted(hip.created)


def test_cu_mask_stream_failure_is_a_clear_error():
    with pytest.raises(RuntimeError, match="hipExtStreamCreateWithCUMask.*error 101"):
        CuMaskStreams(304, [0.5], hip=FakeHip(fail=101))


class FakeCuda:
    """What prefill_gpu takes from torch.cuda on ROCm: the device's CU count, ExternalStream and the stream context."""

    def __init__(self, num_cus: int = 304) -> None:
        self.num_cus = num_cus
        self.current = None  # the stream a pass runs on

    def get_device_properties(self, device):
        return type("Props", (), {"multi_processor_count": self.num_cus})()

    def ExternalStream(self, handle, device=None):  # noqa: N802
        return ("stream", handle, device)

    @contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before


@dataclass
class FakeOwnStream:
    """The worker's OwnStream: its lock, and a stream that records being synchronized."""

    lock: threading.Lock = dataclass_field(default_factory=threading.Lock)
    stream: object = None

    def run(self, fn, *args):
        with self.lock:
            return fn(*args)


def test_prefill_runs_each_pass_on_the_cu_mask_stream_of_the_current_rung():
    hip, cuda, own = FakeHip(), FakeCuda(304), FakeOwnStream()
    ctl = SplitController(SLO)
    gpu = prefill_gpu(own, "cuda:0", True, lambda: ctl.split.prefill_share, hip=hip, cuda=cuda)
    assert isinstance(gpu, CuMaskGpu) and gpu.lock is own.lock  # one pass at a time, as on the own stream
    assert sorted(map(len, hip.created.values())) == [10, 10, 10]  # one stream per share, 304 CUs in 10 words
    for level in (NEUTRAL, 1, 0):
        ctl.level = level
        handle = gpu.run(lambda: cuda.current[1])  # the stream the pass ran on
        assert hip.created[handle] == cu_mask(304, LADDER[level].prefill_share)
        assert cuda.current is None  # left after the pass
    assert gpu.run(lambda x: x + 1, 1) == 2


def test_prefill_keeps_its_own_stream_without_rocm_the_split_or_hip(caplog):
    own = FakeOwnStream()
    assert prefill_gpu(own, "cpu", True, lambda: 1.0) is own  # this CPU build of torch is not ROCm
    assert prefill_gpu(own, "cuda:0", False, lambda: 1.0, hip=FakeHip(), cuda=FakeCuda()) is own  # split off
    with caplog.at_level(logging.WARNING, logger="kvrelay.split"):
        assert prefill_gpu(own, "cuda:0", True, lambda: 1.0, hip=FakeHip(fail=101), cuda=FakeCuda()) is own
    assert [r.getMessage() for r in caplog.records] == [
        "CU-mask streams unavailable (RuntimeError: hipExtStreamCreateWithCUMask(0.25 of 304 CUs) failed: error 101); "
        "prefill runs on its own stream"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvrelay.split"):  # no libamdhip64.so on this machine
        assert prefill_gpu(own, "cuda:0", True, lambda: 1.0, cuda=FakeCuda()) is own
    assert len(caplog.records) == 1 and "(OSError: " in caplog.records[0].getMessage()


def test_prepare_work_on_the_own_stream_is_done_before_a_cu_mask_pass():
    synced = []
    own = FakeOwnStream(stream=type("Stream", (), {"synchronize": lambda self: synced.append(True)})())
    prefill_gpu(own, "cuda:0", True, lambda: 1.0, hip=FakeHip(), cuda=FakeCuda())
    assert synced == [True]


def test_itl_window_measures_gaps_of_a_running_batch_only():
    w = ItlWindow()
    w.step_done(0.000, True)
    w.step_done(0.010, True)
    w.step_done(0.030, False)  # the batch emptied after this step
    w.step_done(5.000, True)  # the wait for new work is not a gap
    w.step_done(5.008, True)
    assert w.p90_ms(5.01) == pytest.approx(8.0)  # the old gaps fell out of the window
    w.step_done(5.020, True)
    assert w.p90_ms(5.03) == pytest.approx(12.0)
    assert w.mean_ms(5.03) == pytest.approx(10.0)
    assert ItlWindow().p90_ms(1.0) is None and ItlWindow().mean_ms(1.0) is None


def test_itl_window_of_steps_slower_than_the_window_is_the_gap_in_progress():
    w = ItlWindow()  # 1 s window; decode steps of 3 s (hundreds of sessions on a loaded CPU)
    w.step_done(0.0, True)
    assert w.mean_ms(0.5) is None  # the first step's gap has not run a window long yet
    w.step_done(3.0, True)
    assert w.mean_ms(3.5) == pytest.approx(3000.0)  # the gap that ended in the window
    assert w.mean_ms(4.5) == pytest.approx(3000.0)  # none ended in it: the last gap, not None
    assert w.mean_ms(7.0) == pytest.approx(4000.0)  # the gap in progress, once longer
    w.step_done(7.0, False)  # the batch emptied: no gap in progress
    assert w.mean_ms(8.5) is None
    w.step_done(20.0, True)  # a new batch: the old one's gaps are not its ITL
    assert w.mean_ms(20.5) is None and w.mean_ms(21.5) == pytest.approx(1500.0)
    w.step_done(23.0, True)
    w.idle()  # its sequences ended between steps: decode waits for work, no gap is in progress
    assert w.mean_ms(30.0) is None


def test_slow_decode_steps_refuse_new_prompts_between_steps():
    w = ItlWindow()
    for t in (0.0, 3.0, 6.0):
        w.step_done(t, True)
    slo = Slo(ttft_ms=0, itl_ms=1000)  # refused past 1.5 s
    assert refusal(0, 10, rate_of(1000.0), slo, decode_itl_ms=w.mean_ms(6.5)) is not None  # a step ended in it
    assert refusal(0, 10, rate_of(1000.0), slo, decode_itl_ms=w.mean_ms(7.5)) is not None  # mid-step


def test_refuses_while_decode_is_past_its_itl_slo():
    slo = Slo(ttft_ms=2000, itl_ms=20)
    rate = rate_of(1000.0)
    assert refusal(0, 10, rate, slo, decode_itl_ms=20 * DECODE_OVERLOAD) is None  # at the margin: admitted
    why = refusal(0, 10, rate, slo, decode_itl_ms=20 * DECODE_OVERLOAD + 1)  # past it: even alone
    assert why is not None and "31 ms a token" in why and "20 ms ITL SLO" in why
    assert refusal(0, 10, rate, Slo(ttft_ms=2000, itl_ms=0), decode_itl_ms=1e6) is None  # ITL SLO off
    assert refusal(0, 10, rate, slo, decode_itl_ms=None) is None  # decode idle, or its ITL unknown
