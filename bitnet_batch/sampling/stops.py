"""Stop strings over streamed text.

Text arrives in pieces (one detokenized token at a time). ``StopMatcher.push`` returns the part that is safe to
emit: it holds back the longest tail that could still be the start of a stop string, so a stop string split
across pieces is never partly emitted. The matcher stops at the stop string that is *completed first*; when two
complete at the same character the one that starts earlier (the longer) wins. Both rules depend only on the
text, never on how it was cut into pieces.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError


class StopMatcher:
    """Finds the first stop string in a stream of text pieces. Not reusable after ``flush`` without ``reset``."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = (stops,)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = tuple(dict.fromkeys(stops))      # de-duplicated, order kept
        self._longest = max((len(s) for s in self.stops), default=0)
        self.reset()

    def reset(self) -> None:
        """Forget held text and any match: ready for a new stream."""
        self._held = ""
        self.stopped = False
        self.matched: str | None = None          # the stop string that ended the stream

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece; returns (text safe to emit now, stopped?). Once stopped, further pieces are dropped."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        hit = self._first_completed(buf)
        if hit is not None:
            start, stop = hit
            self._held, self.stopped, self.matched = "", True, stop
            return buf[:start], True
        keep = self._held_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """End of generation: release the held-back text (nothing once stopped)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_completed(self, buf: str) -> tuple[int, str] | None:
        """(start, stop) of the occurrence that ends first, ties to the earliest start; None when none occurs.

        Earlier pushes held no complete stop string, so any occurrence ends in the new text."""
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            start = buf.find(stop)                    # the first occurrence is also the one ending first
            if start >= 0:
                key = (start + len(stop), start, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_tail(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of some stop string."""
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[len(buf) - n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
