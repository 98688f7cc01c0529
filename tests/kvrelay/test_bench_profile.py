"""bench/profile_decode.py's breakdown of a kernel by its place in a layer (pure bookkeeping, checked on the CPU)."""

from __future__ import annotations

from bench.profile_decode import by_position


def test_by_position_splits_launches_by_their_place_in_a_layer() -> None:
    # 2 steps of 2 layers x 4 projections + one launch after the layers (a batch-1 step's GEMVs with the lm_head)
    step = [10.0, 5.0, 40.0, 20.0, 11.0, 6.0, 42.0, 22.0, 100.0]
    places = by_position(step + [x + 1 for x in step], steps=2, num_layers=2)
    assert [p for p, _, _ in places] == ["layer slot 0", "layer slot 1", "layer slot 2", "layer slot 3",
                                         "after the layers"]  # fmt: skip
    got = {p: (us, calls) for p, us, calls in places}
    assert got["layer slot 0"] == ((10 + 11 + 11 + 12) / 2, 2)
    assert got["layer slot 2"] == ((40 + 42 + 41 + 43) / 2, 2)
    assert got["after the layers"] == ((100 + 101) / 2, 1)
    assert sum(us for _, us, _ in places) == (sum(step) + sum(x + 1 for x in step)) / 2


def test_by_position_refuses_what_does_not_split() -> None:
    assert by_position([1.0, 2.0, 3.0], steps=2, num_layers=1) == []  # not equal steps
    assert by_position([1.0, 2.0], steps=2, num_layers=4) == []  # fewer launches than layers
