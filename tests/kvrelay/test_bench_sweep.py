"""The sweep's records from load-run documents shaped as `kvrelay bench serve` writes them (bench/sweep.py)."""

from __future__ import annotations

import json

import pytest

import bench.common
from bench import sweep


def run_doc(goodput: float, fraction: float, ttft: float, itl_during: float, itl_none: float, gaps: int = 2000):
    stats = lambda p50, p99, n=100: {"p50": p50, "p99": p99, "count": n}  # noqa: E731
    return {
        "summary": {
            "num_requests": 100, "num_ok": 100, "errors": {}, "elapsed_s": 30.0,
            "goodput": {"requests_per_s": goodput, "fraction": fraction},
            "ttft_ms": stats(ttft, ttft * 3), "itl_ms": stats(8.0, itl_during),
            "itl_ms_prefill_running": stats(9.0, itl_during, gaps), "itl_ms_no_prefill": stats(7.0, itl_none, gaps),
            "server_ms": {"prefill_ms": stats(200.0, 400.0)},
        }
    }  # fmt: skip


@pytest.fixture
def summary(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "SUMMARY", tmp_path / "summary.json")
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    return tmp_path / "summary.json"


def test_records_pick_the_worst_rate_the_knee_and_the_lightest(summary):
    coloc = {"1": (1.0, 1.0, 200), "2": (1.9, 0.95, 220), "3": (2.0, 0.67, 300), "4": (1.2, 0.3, 900)}
    ours = {"1": (0.98, 0.98, 250), "2": (2.0, 1.0, 260), "3": (3.0, 1.0, 280), "4": (2.4, 0.6, 400)}

    def curve(points, itl_during, scale=1.0):
        return {r: sweep.rate_point(run_doc(g * scale, f, t, itl_during(r), 10.0), float(r)) for r, (g, f, t) in points.items()}  # noqa: E501 # fmt: skip

    sweeps = {
        "colocated@4096": curve(coloc, lambda r: 100.0),
        "colocated-noadm@4096": curve(coloc, lambda r: 100.0, scale=0.5),
        "disaggregated": curve(ours, lambda r: 11.0 + float(r)),
    }
    out = sweep.sweep_records(sweeps, "disaggregated", "cmd", "slo")
    assert out["goodput_ratio_min_over_sweep"]["value"] == pytest.approx(0.98)
    assert out["goodput_ratio_min_over_sweep"]["at_rate"] == 1.0
    assert (
        out["goodput_ratio_at_knee"]["value"] == pytest.approx(1.5) and out["goodput_ratio_at_knee"]["at_rate"] == 3.0
    )
    assert out["ttft_p50_ratio_light_load"]["value"] == pytest.approx(1.25)
    assert out["interference_itl_p99_ratio"]["value"] == pytest.approx(1.5)  # the worst rate: (11 + 4) / 10
    saved = {r["name"]: r for r in json.loads(summary.read_text())["records"]}
    assert saved["goodput_ratio_at_knee"]["per_rate"][0]["colocated_mode"] == "colocated@4096"  # the best colocated


def test_too_few_gaps_give_no_interference_ratio():
    point = sweep.rate_point(run_doc(1.0, 1.0, 200, 20.0, 10.0, gaps=999), 1.0)
    assert point["interference"] is None
