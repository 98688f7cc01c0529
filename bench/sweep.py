"""The load sweep of `bench/serve_modes.py --sweep RATES`: one deployment per mode, every rate run on it in turn, and
the four records of the adaptive split (issue 20) from the sweeps of the default disaggregated deployment and of the
best colocated one at each rate.

Records (value = the ratio; the GPU is named in each):
- goodput_ratio_min_over_sweep: disaggregated goodput / best colocated goodput, the worst rate of the sweep (>= 1.0);
- goodput_ratio_at_knee: the same ratio at the first rate where colocated serves < 90% of requests within SLO (>= 1.5);
- ttft_p50_ratio_light_load: disaggregated TTFT p50 / colocated TTFT p50 at the lightest rate (<= 1.3);
- interference_itl_p99_ratio: ITL p99 of gaps with a prefill running / without, same run, the worst rate (<= 1.25).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import RESULTS, record

KNEE_FRACTION = 0.9  # colocated's knee: the first rate where fewer than this fraction of its requests meet the SLO
MIN_GAPS = 1000  # fewest token gaps on each side of the interference split for its p99 to mean something


def rate_point(loaded_run: dict, rate: float) -> dict:
    """What the sweep keeps of one load run (`kvrelay bench serve`'s JSON document)."""
    s = loaded_run["summary"]
    during, outside = s["itl_ms_prefill_running"], s["itl_ms_no_prefill"]
    enough = min(during["count"], outside["count"]) >= MIN_GAPS
    return {
        "rate": rate,
        "requests": s["num_requests"],
        "ok": s["num_ok"],
        "errors": s["errors"],
        "goodput": s["goodput"]["requests_per_s"],
        "fraction_in_slo": s["goodput"]["fraction"],
        "ttft_p50": s["ttft_ms"]["p50"],
        "ttft_p99": s["ttft_ms"]["p99"],
        "itl_p50": s["itl_ms"]["p50"],
        "itl_p99": s["itl_ms"]["p99"],
        "itl_p99_prefill_running": during["p99"],
        "itl_p99_no_prefill": outside["p99"],
        "gaps_prefill_running": during["count"],
        "gaps_no_prefill": outside["count"],
        "interference": during["p99"] / outside["p99"] if enough else None,
        "server_prefill_p50": s["server_ms"]["prefill_ms"]["p50"],
        "elapsed_s": s["elapsed_s"],
    }


def best_colocated(sweeps: dict[str, dict[str, dict]], rate: str) -> tuple[str, dict] | None:
    """The colocated mode with the most goodput at this rate (any chunk, with or without admission)."""
    options = [(m, s[rate]) for m, s in sweeps.items() if m.startswith("colocated") and rate in s]
    return max(options, key=lambda o: o[1]["goodput"], default=None)


def sweep_records(sweeps: dict[str, dict[str, dict]], disagg: str, command: str, slo: str, **extra) -> dict:
    """The four records from the sweeps (mode -> rate -> point); returns what it recorded, by name."""
    ours = sweeps.get(disagg)
    if not ours or not any(m.startswith("colocated") for m in sweeps):
        print(f"sweep records need {disagg!r} and a colocated mode; have {sorted(sweeps)}")
        return {}
    rates = sorted((r for r in ours if best_colocated(sweeps, r)), key=float)
    rows = []
    for r in rates:
        base_mode, base = best_colocated(sweeps, r)
        p = ours[r]
        ratio = p["goodput"] / base["goodput"] if base["goodput"] > 0 else (float("inf") if p["goodput"] else None)
        rows.append({"rate": float(r), "ratio": ratio, "ours": p, "colocated": base, "colocated_mode": base_mode})
    per_rate = [
        {
            "rate": x["rate"],
            "goodput": round(x["ours"]["goodput"], 3),
            "colocated_goodput": round(x["colocated"]["goodput"], 3),
            "colocated_mode": x["colocated_mode"],
            "ratio": None if x["ratio"] is None else round(x["ratio"], 3),
            "colocated_in_slo": round(x["colocated"]["fraction_in_slo"], 3),
            "ours_in_slo": round(x["ours"]["fraction_in_slo"], 3),
            "interference": x["ours"]["interference"] and round(x["ours"]["interference"], 3),
        }
        for x in rows
    ]
    common = extra | {
        "command": command,
        "slo": slo,
        "modes": f"{disagg} over the best of {sorted(m for m in sweeps if m.startswith('colocated'))}",
        "per_rate": per_rate,
    }
    out = {}
    finite = [x for x in rows if x["ratio"] is not None]
    if finite:
        worst = min(finite, key=lambda x: x["ratio"])
        v = worst["ratio"]
        out["goodput_ratio_min_over_sweep"] = record(
            "goodput_ratio_min_over_sweep", v, "x", 1.0, v / 1.0, at_rate=worst["rate"], **common
        )
    knee = next((x for x in rows if x["colocated"]["fraction_in_slo"] < KNEE_FRACTION), None)
    if knee is not None and knee["ratio"] is not None:
        v = knee["ratio"]
        out["goodput_ratio_at_knee"] = record(
            "goodput_ratio_at_knee", v, "x", 1.5, v / 1.5, at_rate=knee["rate"], **common
        )
    elif knee is None:
        print("the sweep never reached colocated's knee (every rate >= 90% within SLO): no goodput_ratio_at_knee")
    light = rows[0] if rows else None
    if light and light["colocated"]["ttft_p50"]:
        v = light["ours"]["ttft_p50"] / light["colocated"]["ttft_p50"]
        out["ttft_p50_ratio_light_load"] = record(
            "ttft_p50_ratio_light_load", v, "x", 1.3, 1.3 / v, at_rate=light["rate"],
            ttft_p50_ms=light["ours"]["ttft_p50"], colocated_ttft_p50_ms=light["colocated"]["ttft_p50"], **common,
        )  # fmt: skip
    measured = [x for x in rows if x["ours"]["interference"] is not None]
    if measured:
        worst = max(measured, key=lambda x: x["ours"]["interference"])
        v = worst["ours"]["interference"]
        out["interference_itl_p99_ratio"] = record(
            "interference_itl_p99_ratio", v, "x", 1.25, 1.25 / v, at_rate=worst["rate"],
            definition="ITL p99 of gaps with a prefill running / without, same run; the worst rate of the sweep",
            itl_p99_prefill_running_ms=worst["ours"]["itl_p99_prefill_running"],
            itl_p99_no_prefill_ms=worst["ours"]["itl_p99_no_prefill"], **common,
        )  # fmt: skip
    return out


def plot(sweeps: dict[str, dict[str, dict]], path: Path, title: str) -> Path | None:
    """Goodput, TTFT p50/p99 and ITL p99 against the offered rate, one line per mode (PNG); None without
    matplotlib (the GPU machine has none: plot from the JSON afterwards with --plot-only)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no sweep plot (python -m bench.serve_modes --plot-only FILE)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, points in sorted(sweeps.items()):
        rates = sorted(points, key=float)
        x = [float(r) for r in rates]
        (line,) = axes[0].plot(x, [points[r]["goodput"] for r in rates], marker="o", label=mode)
        color = line.get_color()  # one colour a mode in every panel
        axes[1].plot(x, [points[r]["ttft_p50"] / 1e3 for r in rates], marker="o", color=color, label=f"{mode} p50")
        axes[1].plot(x, [points[r]["ttft_p99"] / 1e3 for r in rates], marker="x", linestyle="--", color=color,
                     label=f"{mode} p99")  # fmt: skip
        axes[2].plot(x, [points[r]["itl_p99"] for r in rates], marker="o", color=color, label=mode)
    top = max(float(r) for p in sweeps.values() for r in p)
    axes[0].plot([0, top], [0, top], color="grey", linewidth=0.5, label="offered")
    for ax, label in zip(axes, ("goodput (req/s within SLO)", "TTFT (s)", "ITL p99 (ms)"), strict=True):
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def stamp() -> str:
    return time.strftime("%H:%M:%S")


SWEEP_JSON = RESULTS / "serve_sweep.json"
