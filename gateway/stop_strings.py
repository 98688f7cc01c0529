"""Stop strings over streamed text: text that might be the start of a stop string is held back until it is not."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""  # text received but not released: could still turn into a stop string
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Text safe to send now. After a match, everything from the stop string on is dropped."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            index, stop = min(hits)
            self.matched = stop
            out, self.pending = self.pending[:index], ""
            return out
        # keep the longest tail that is a prefix of some stop string
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.matched else self.pending), ""
        return out
