"""Stop strings over streamed text: emit only text that can no longer turn into a stop string.

    f = StopStrings(["\\n\\n", "User:"])
    out = f.push("Hello\\n")         # -> "Hello"   ("\\n" is held back: it may start "\\n\\n")
    out = f.push("\\nmore")          # -> ""        f.stopped is True; nothing after the match leaks
    out = f.flush()                 # -> held text at the end of generation (no stop matched)

The streamed pieces, concatenated, always equal what a non-streamed request returns: both paths run
the same filter over the same decoded text, and the result does not depend on how the text is split
into pieces. A stop string is matched anywhere in the generated text (not in the prompt) and is not
included in the output, as OpenAI does; generation ends at the stop string that is complete first.
"""

from __future__ import annotations

from typing import Iterable

MAX_STOPS = 4  # OpenAI's limit


def first_stop(text: str, stops: list[str]) -> int:
    """Start of the stop string that is complete first when ``text`` is read left to right
    (the earliest end; at equal ends the longest, i.e. earliest start); -1 when none occurs."""
    best_end, best_start = None, -1
    for stop in stops:
        i = text.find(stop)
        if i >= 0:
            end = i + len(stop)
            if best_end is None or end < best_end or (end == best_end and i < best_start):
                best_end, best_start = end, i
    return best_start


class StopStrings:
    """Incremental stop-string matcher with hold-back of possible partial matches."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""          # decoded text not yet emitted (could be the start of a stop string)
        self.stopped = False
        self.text = ""             # everything emitted so far

    def _hold(self, s: str) -> int:
        """Length of the longest suffix of ``s`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(s)), best, -1):
                if s.endswith(stop[:k]):
                    best = k
                    break
        return best

    def push(self, piece: str) -> str:
        """Add decoded text; return the part that is now safe to emit ('' once stopped)."""
        if self.stopped or not piece:
            return ""
        if not self.stops:
            self.text += piece
            return piece
        s = self.pending + piece
        cut = first_stop(s, self.stops)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            out = s[:cut]
        else:
            keep = self._hold(s)
            out, self.pending = s[:len(s) - keep], s[len(s) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """Generation ended without a stop string: release the held-back text."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        self.text += out
        return out


__all__ = ["StopStrings", "first_stop", "MAX_STOPS"]
