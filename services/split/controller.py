"""The adaptive split between prefill and decode on one GPU, and SLO-aware admission: pure decisions over measured
numbers (no torch, no Redis, no gRPC), so the CPU tests drive them with a simulated timing model.

What moves compute between the two processes (services/split/mechanism.py applies a `Split`):
- prefill's duty cycle: after a forward pass of t seconds prefill idles t * (1 - duty) / duty, so at duty 0.5 it
  computes half the time and decode has the GPU (SMs and bandwidth) alone the other half;
- decode's yield: while a prefill is running, decode waits this long before each step, so prefill has the GPU alone
  for that long every step (on NVIDIA under MPS both run at once; a paused decode leaves prefill every SM);
- on AMD, also prefill's stream by CU-mask share (`CuMaskStreams`).

The ladder below orders them from decode-first to prefill-first. The controller climbs it when the prefill queue's
predicted TTFT passes GROW_AT of the TTFT SLO and decode's ITL has room under its budget (ITL_BUDGET of the ITL
SLO), climbs down when decode's ITL passes that budget, and drifts back to the neutral rung when nothing presses. It
changes at most one rung per DWELL_S: it never oscillates faster than 2 * DWELL_S a period.
"""

from __future__ import annotations

from dataclasses import dataclass

# Decode's measured ITL (p90 of the last window) may reach this fraction of the ITL SLO before prefill gives back: the
# rest is margin for the window's noise and for a request's mean ITL, which counts its slowest gaps too.
ITL_BUDGET = 0.75
HEADROOM = 0.8  # prefill may take more only while decode's ITL is below HEADROOM * budget
# The queue's predicted TTFT above which prefill asks for more: a quarter of the SLO, so it grows while requests still
# meet the SLO instead of after they start to miss it.
GROW_AT = 0.25
DWELL_S = 1.0  # at least this long between two changes of the split
TICK_S = 0.25  # how often the workers publish what they measure and the controller decides


@dataclass(frozen=True)
class Slo:
    """The deployment's service-level objectives; 0 turns one off."""

    ttft_ms: float = 2000.0
    itl_ms: float = 20.0


@dataclass(frozen=True)
class Split:
    """One rung: what prefill and decode each do while both have work."""

    prefill_duty: float  # fraction of the time prefill computes (1: as fast as it can)
    decode_yield_ms: float  # decode's pause before each step while a prefill runs
    prefill_share: float  # AMD: the fraction of the CUs prefill's stream may use (CU masks)


LADDER = (
    Split(0.25, 0.0, 0.25),
    Split(0.5, 0.0, 0.5),
    Split(1.0, 0.0, 0.75),  # neutral: both run at once, nobody waits
    Split(1.0, 2.0, 1.0),
    Split(1.0, 5.0, 1.0),
    Split(1.0, 10.0, 1.0),
)
NEUTRAL = 2


@dataclass(frozen=True)
class Observation:
    now: float  # seconds, any monotonic clock
    decode_itl_ms: float | None  # decode's ITL p90 over the last window; None: decode ran no step in it
    queue_ttft_ms: float  # predicted TTFT of the newest prompt in prefill's queue (0: nothing queued)


class SplitController:
    """Chooses the rung from what decode and prefill measured (one controller per prefill worker)."""

    def __init__(self, slo: Slo, level: int = NEUTRAL) -> None:
        self.slo = slo
        self.level = level
        self.changed_at = float("-inf")

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
            return -1 if self.level > 0 else 0
        if pressure and room:
            return 1 if self.level < len(LADDER) - 1 else 0
        if not pressure and self.level > NEUTRAL:
            return -1  # nothing queues: decode gets its time back
        if room and self.level < NEUTRAL:
            return 1  # decode has room again: prefill need not hold back
        return 0


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


def refusal(queued_tokens: int, prompt_tokens: int, rate: PrefillRate, slo: Slo, duty: float = 1.0) -> str | None:
    """SLO-aware admission: why a new prompt is refused now (RESOURCE_EXHAUSTED), or None to admit it.

    Its predicted TTFT is the time to prefill everything queued before it and itself at the measured speed (at full
    duty: the controller stops pacing prefill when the queue presses). A prompt that cannot meet the TTFT SLO is told
    so at once instead of queueing and pushing the prompts behind it out of the SLO too. Before the first measurement
    everything is admitted. Prompts already admitted are never dropped by this."""
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


def slo_and_split(settings, device) -> tuple[Slo, bool]:
    """A prefill worker's SLOs (None: the device's default) and whether its split adapts."""
    gpu = device.type == "cuda"
    ttft = settings.slo_ttft_ms if settings.slo_ttft_ms is not None else (GPU_SLO.ttft_ms if gpu else 0.0)
    itl = settings.slo_itl_ms if settings.slo_itl_ms is not None else (GPU_SLO.itl_ms if gpu else 0.0)
    return Slo(ttft, itl), split_on(settings, device)
