"""Stop strings on a session's growing text (torch-free): which token completes the first stop string, and
which text may be sent before it.

A session's text grows by the tokens each round commits, decoded one token at a time. A stop string may
be split across tokens and across rounds, so text that could be the beginning of a stop string is held
back until the next tokens show whether it is: the text released is always the session's text up to its
longest suffix that is a proper prefix of a stop string. That depends only on the text so far, never on
how it was cut into rounds (a resumed stream, which replays its client's tokens through a fresh
`StopText`, holds back exactly what its first stream held back and sends it now). When a stop string
appears, the token that completed it is the session's last, and the text ends where the string begins
(OpenAI's and vLLM's `stop`: the string itself is not returned).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Scan:
    """What one batch of tokens gave: the text to send now, and `keep`, the number of those tokens up to and
    including the one that completed a stop string (None: no stop string appeared)."""

    text: str
    keep: int | None = None


def held_back(text: str, strings: Iterable[str]) -> int:
    """The length of `text`'s longest suffix that is a proper prefix of one of `strings`."""
    longest = 0
    for s in strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def first_stop(text: str, strings: Iterable[str]) -> int | None:
    """Where the earliest of `strings` begins in `text` (None: none occurs)."""
    found = [i for i in (text.find(s) for s in strings) if i >= 0]
    return min(found) if found else None


class StopText:
    """The text of a session's generated tokens, with its stop strings found (see the module's doc).
    `step(token)` is an incremental detokenizer: the text one more token adds (None: no tokenizer, no text;
    stop strings then need one and are refused up front)."""

    def __init__(self, strings: tuple[str, ...], step: Callable[[int], str] | None):
        self.strings, self.step = strings, step
        self._pending = ""  # decoded, not sent: it may begin a stop string

    def feed(self, tokens: list[int]) -> Scan:
        """The text `tokens` add that may be sent now, and where a stop string ended them, if one did."""
        if self.step is None:
            return Scan("")
        if not self.strings:
            return Scan("".join(self.step(t) or "" for t in tokens))
        for i, token in enumerate(tokens):
            self._pending += self.step(token) or ""
            # Text before the pending part was released: it holds no stop string and no stop string starts
            # in it (it would make a longer held suffix), so only the pending text needs searching.
            at = first_stop(self._pending, self.strings)
            if at is not None:
                text, self._pending = self._pending[:at], ""
                return Scan(text, i + 1)
        held = held_back(self._pending, self.strings)
        text, self._pending = self._pending[: len(self._pending) - held], self._pending[len(self._pending) - held :]
        return Scan(text)

    def skip(self, tokens: list[int]) -> None:
        """Takes `tokens` as sent (a resumed stream's client has them): what they released is not sent again,
        what they held back is sent with the next tokens."""
        self.feed(tokens)

    def flush(self) -> str:
        """The text held back, at the session's end without a stop string (it began none after all)."""
        text, self._pending = self._pending, ""
        return text
