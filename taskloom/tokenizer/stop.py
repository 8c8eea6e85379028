"""Stop strings: end a request's output at the first stop string, across token boundaries.

Text arrives in deltas (one per detokenized step), and a stop string may straddle several.
The matcher holds back the longest tail of the text that could still grow into a stop string,
so no part of a stop string is ever emitted, and cuts the output where the first stop string
completes. When the stop string is to be included in the output, nothing needs holding back:
text is emitted at once and the match is found with the already-emitted tail as context.

Pure Python (the engine's output processing uses it; it must not import torch).
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas.

    Args:
        stop: the stop strings (non-empty); an empty list never matches.
        include_stop_str_in_output: emit the matched stop string as the end of the output.

    Raises:
        ValueError: a stop string is not a non-empty string.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            raise ValueError(f"stop must be a list of strings, got the string {stop!r}")
        for index, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{index}] must be a non-empty string, got {s!r}")
        self._stop = tuple(dict.fromkeys(stop))
        self._include = include_stop_str_in_output
        self._context_len = max((len(s) for s in self._stop), default=1) - 1
        self._held = ""     # text not emitted yet (only when the stop string is excluded)
        self._context = ""  # emitted text kept to find matches that start in it
        self._matched: str | None = None

    @property
    def matched(self) -> str | None:
        """The stop string that ended the output, or None while none has matched."""
        return self._matched

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that completes first in `text`; on a tie in end
        position, the longest (it started first)."""
        best: tuple[int, int, str] | None = None
        for s in self._stop:
            start = text.find(s)
            if start < 0:
                continue
            end = start + len(s)
            if best is None or (end, start) < (best[0], best[1]):
                best = (end, start, s)
        return None if best is None else (best[1], best[2])

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def push(self, delta: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit now, the stop string matched or None).

        After a match the output is complete (truncated before the stop string, or right after
        it when it is included); pushing more raises RuntimeError.
        """
        if self._matched is not None:
            raise RuntimeError(f"stop string {self._matched!r} already matched; the output is "
                               f"complete")
        if not self._stop:
            return delta, None
        text = self._context + self._held + delta
        match = self._first_match(text)
        skip = len(self._context)
        if match is not None:
            start, s = match
            self._matched = s
            self._held = self._context = ""
            end = start + len(s) if self._include else start
            return text[skip:end], s
        if self._include:
            self._context = text[-self._context_len:] if self._context_len else ""
            return text[skip:], None
        keep = self._partial_suffix_len(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], None

    def flush(self) -> str:
        """Return the held-back text when the sequence ends for another reason (EOS, length)."""
        held, self._held = self._held, ""
        return held
