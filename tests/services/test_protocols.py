"""The Protocols the services depend on are met by the implementations that stand behind them: each Protocol method
exists on the implementation, is async where the Protocol's is, and accepts every call the Protocol allows."""

from __future__ import annotations

import inspect

import pytest

from kvstore.allocator import BlockAllocator
from kvstore.sessions import SessionStore
from services.decode.step_loop import DecodeStore
from services.model.engine import Allocator
from tests.services.test_decode_overlap import MemoryStore


def calls(method) -> list[tuple[list[object], dict[str, object]]]:
    """The argument shapes a caller following `method`'s signature may use: each positional-or-keyword parameter
    passed both ways; the optional ones also left out."""
    positional, keywords, optional = [], {}, []
    for p in list(inspect.signature(method).parameters.values())[1:]:
        if p.kind is p.POSITIONAL_ONLY:
            positional.append(p.name)
        else:
            keywords[p.name] = p.kind
            if p.default is not p.empty:
                optional.append(p.name)
    shapes = [([object()] * len(positional), {name: object() for name in keywords})]
    by_position = [n for n, kind in keywords.items() if kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    shapes.append(
        ([object()] * (len(positional) + len(by_position)), {n: object() for n in keywords if n not in by_position})
    )
    shapes.append(([object()] * len(positional), {n: object() for n in keywords if n not in optional}))
    return shapes


@pytest.mark.parametrize(
    ("protocol", "impl"),
    [(DecodeStore, SessionStore), (DecodeStore, MemoryStore), (Allocator, BlockAllocator)],
)
def test_the_implementation_accepts_every_call_the_protocol_allows(protocol, impl):
    methods = {name: fn for name, fn in vars(protocol).items() if inspect.isfunction(fn) and not name.startswith("_")}
    assert methods
    for name, spec in methods.items():
        real = getattr(impl, name)
        assert inspect.iscoroutinefunction(real) == inspect.iscoroutinefunction(spec), name
        for args, kwargs in calls(spec):
            inspect.signature(real).bind(None, *args, **kwargs)  # TypeError when the call does not fit
