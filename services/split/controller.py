"""The adaptive split between prefill and decode on one GPU, and SLO-aware admission: pure decisions over measured
numbers (no torch, no Redis, no gRPC), so the CPU tests drive them with a simulated timing model.

What moves compute between the two processes:
- decode's pauses (`PauseCredit`, per step, in the decode worker): decode earns credit when its tokens come faster
  than its ITL budget (ITL_BUDGET of the ITL SLO) and spends it pausing while prefill announces a forward pass, so
  that pass has the GPU alone. Measured on an H100 under MPS (8B shape, 2026-12-08), a prefill and a decode running
  at once each ran at about half speed or less (decode 6-7 ms a step alone, 15-17 ms beside a prefill), so taking
  turns while decode has slack serves more than running together; with no slack left decode never pauses, and both
  run at once;
- prefill's duty cycle (`Split`, the rung below, chosen by `SplitController` in the prefill worker): after a forward
  pass of t seconds prefill idles t * (1 - duty) / duty, for when decode's ITL is over budget even without pausing;
- on AMD, also prefill's stream by CU-mask share (`CuMaskStreams`), set with the rung.

The controller climbs down the ladder when decode's ITL (the mean of its last window) passes its budget and back up
(to the top: prefill unpaced) when decode has room again; while below the top it climbs only when the prefill
queue's predicted TTFT passes GROW_AT of the TTFT SLO or decode has room. It changes at most one rung per DWELL_S: it
never oscillates faster than 2 * DWELL_S a period.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decode's ITL (the mean of its last window; the SLO is on a request's mean) may reach this fraction of the ITL SLO:
# the rest is margin for the window's noise and for requests that join mid-window.
ITL_BUDGET = 0.8
HEADROOM = 0.8  # prefill may take more only while decode's ITL is below HEADROOM * budget
# The queue's predicted TTFT above which prefill asks for more: a quarter of the SLO, so it grows while requests still
# meet the SLO instead of after they start to miss it.
GROW_AT = 0.25
DWELL_S = 1.0  # at least this long between two changes of the split
# A rung where decode was over budget is not climbed back to for the queue's sake for this long (the load may have
# changed by then: it is tried again).
MEMORY_S = 10.0
TICK_S = 0.25  # how often the workers publish what they measure and the controller decides


@dataclass(frozen=True)
class Slo:
    """The deployment's service-level objectives; 0 turns one off."""

    ttft_ms: float = 2000.0
    itl_ms: float = 20.0


@dataclass(frozen=True)
class Split:
    """One rung: how much of the GPU prefill takes while decode has work too."""

    prefill_duty: float  # fraction of the time prefill computes (1: as fast as it can)
    prefill_share: float  # AMD: the fraction of the CUs prefill's stream may use (CU masks)


LADDER = (Split(0.25, 0.25), Split(0.5, 0.5), Split(1.0, 1.0))
NEUTRAL = len(LADDER) - 1  # prefill unpaced; decode's pauses do the rest


@dataclass(frozen=True)
class Observation:
    now: float  # seconds, any monotonic clock
    decode_itl_ms: float | None  # decode's mean ITL over the last window; None: decode ran no step in it
    queue_ttft_ms: float  # predicted TTFT of the newest prompt in prefill's queue (0: nothing queued)


class SplitController:
    """Chooses the rung from what decode and prefill measured (one controller per prefill worker)."""

    def __init__(self, slo: Slo, level: int = NEUTRAL) -> None:
        self.slo = slo
        self.level = level
        self.changed_at = float("-inf")
        self.over_at: dict[int, float] = {}  # rung -> when decode was last over budget there

    @property
    def split(self) -> Split:
        return LADDER[self.level]

    def decide(self, obs: Observation) -> Split:
        if obs.now - self.changed_at >= DWELL_S:
            step = self._step(obs)
            if step:
                self.level += step
                self.changed_at = obs.now
        return self.split

    def _step(self, obs: Observation) -> int:
        budget = self.slo.itl_ms * ITL_BUDGET if self.slo.itl_ms > 0 else float("inf")
        itl = obs.decode_itl_ms
        over = itl is not None and itl > budget
        room = itl is None or itl < budget * HEADROOM
        pressure = self.slo.ttft_ms > 0 and obs.queue_ttft_ms > self.slo.ttft_ms * GROW_AT
        if over:
            self.over_at[self.level] = obs.now
            return -1 if self.level > 0 else 0
        if self.level >= NEUTRAL:
            return 0
        if room:
            return 1  # decode has room again: hold back less
        recently_over = obs.now - self.over_at.get(self.level + 1, float("-inf")) < MEMORY_S
        return 1 if pressure and not recently_over else 0  # the queue presses and the rung above may fit


# The longest decode pauses at once for a prefill pass (and the most credit it saves): a 4k-token pass of the 8B shape
# takes ~150 ms alone on an H100. A request's mean ITL pays for a pause over its whole length (256 tokens: +0.8 ms).
CREDIT_MAX_MS = 200.0


class PauseCredit:
    """Decode's saved slack: each step adds (budget - its gap), so while tokens come faster than the ITL budget decode
    may pause for a prefill pass, and a pause (which lengthens the next gap) is paid back before the next one. Bounded
    both ways: one long pause at most CREDIT_MAX_MS, and a debt (decode slower than budget without pausing) is
    forgotten past the same amount."""

    def __init__(self, budget_ms: float) -> None:
        self.budget_ms = budget_ms
        self.ms = CREDIT_MAX_MS  # an idle worker has all its slack

    def step(self, gap_ms: float) -> None:
        self.ms = max(-CREDIT_MAX_MS, min(CREDIT_MAX_MS, self.ms + self.budget_ms - gap_ms))

    def pause_ms(self, pass_remaining_ms: float) -> float:
        """How long to pause for a prefill pass with this much left to run (0: step now, beside it)."""
        return max(0.0, min(self.ms, pass_remaining_ms))


class PrefillRate:
    """Prefill's measured speed, tokens per second of computing (not of pacing pauses): an exponentially weighted
    mean over forward passes, so it follows the split and the load's mix of prompt lengths."""

    def __init__(self, weight: float = 0.3) -> None:
        self.weight = weight
        self.tokens_per_s: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        w = self.weight
        self.tokens_per_s = rate if self.tokens_per_s is None else (1 - w) * self.tokens_per_s + w * rate

    def predict_ms(self, tokens: int, duty: float = 1.0) -> float:
        """Milliseconds to prefill `tokens` at the measured speed and this duty cycle; 0 before any measurement."""
        if self.tokens_per_s is None or tokens <= 0:
            return 0.0
        return tokens / (self.tokens_per_s * max(duty, 1e-3)) * 1e3


# Decode's mean ITL past this multiple of the ITL SLO refuses new prompts: their streams could not meet it, and each
# one more in the batch slows every running stream further. A margin above 1, so that a short burst (or decode's own
# pauses, which stay under the budget) does not refuse work the SLO would have met.
DECODE_OVERLOAD = 1.5


def refusal(
    queued_tokens: int,
    prompt_tokens: int,
    rate: PrefillRate,
    slo: Slo,
    duty: float = 1.0,
    decode_itl_ms: float | None = None,
) -> str | None:
    """SLO-aware admission: why a new prompt is refused now (RESOURCE_EXHAUSTED), or None to admit it.

    Its predicted TTFT is the time to prefill everything queued before it and itself at the measured speed and the
    current duty. A prompt that cannot meet the TTFT SLO is told so at once instead of queueing and pushing the prompts
    behind it out of the SLO too; a prompt alone is never refused for it, and before the first measurement everything
    is admitted. A prompt is also refused while decode's mean ITL (the slowest decode worker's) is past DECODE_OVERLOAD
    times the ITL SLO. Prompts already admitted are never dropped by this."""
    if slo.itl_ms > 0 and decode_itl_ms is not None and decode_itl_ms > slo.itl_ms * DECODE_OVERLOAD:
        return f"decode is running at {decode_itl_ms:.0f} ms a token, past the {slo.itl_ms:g} ms ITL SLO; retry later"
    if slo.ttft_ms <= 0 or queued_tokens <= 0:
        return None  # a prompt alone is never refused: refusing it makes nobody faster
    predicted = rate.predict_ms(queued_tokens + prompt_tokens, duty)
    if predicted <= slo.ttft_ms:
        return None
    return (
        f"predicted time to first token {predicted:.0f} ms exceeds the {slo.ttft_ms:g} ms SLO "
        f"({queued_tokens} prompt tokens queued ahead at {rate.tokens_per_s:.0f} tokens/s); retry later"
    )


# The defaults where the model runs on a GPU. On the CPU (development, tests) both are off: there the processes do
# not share one device, and a CPU's prefill misses a 2 s TTFT for any long prompt.
GPU_SLO = Slo(2000.0, 20.0)


def split_on(settings, device) -> bool:
    """Whether a worker's split adapts: as set, else on a GPU (ROCm's torch says cuda too)."""
    return settings.split if settings.split is not None else device.type == "cuda"


def _slo_or_default(value: float | None, gpu_default: float, device) -> float:
    """A setting's SLO; unset (None): the GPU default on a GPU, off (0) on the CPU."""
    if value is not None:
        return value
    return gpu_default if device.type == "cuda" else 0.0


def itl_budget_ms(settings, device) -> float:
    """Decode's ITL budget (ITL_BUDGET of the ITL SLO); inf when the SLO is off."""
    slo = _slo_or_default(settings.slo_itl_ms, GPU_SLO.itl_ms, device)
    return slo * ITL_BUDGET if slo > 0 else float("inf")


def slo_and_split(settings, device) -> tuple[Slo, bool]:
    """A prefill worker's SLOs and whether its split adapts."""
    ttft = _slo_or_default(settings.slo_ttft_ms, GPU_SLO.ttft_ms, device)
    itl = _slo_or_default(settings.slo_itl_ms, GPU_SLO.itl_ms, device)
    return Slo(ttft, itl), split_on(settings, device)
