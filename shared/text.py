"""Cutting reply text into speakable pieces: sentences, with the first clause early.

TTS latency is paid per piece, so the first piece should be short: the first clause of the
first sentence goes out on its own when the sentence is long. Works on a finished text
(:func:`split_sentences`) and on a token stream (:class:`SentenceStream`).
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (and closing quotes/brackets) followed by whitespace; not after a
# single capital ("J. Smith"), common abbreviations, or inside a number ("3.5").
_END = re.compile(r"""(?<=[.!?…])["')\]]*\s+""")
_ABBREV = re.compile(r"(?:\b(?:mr|mrs|ms|dr|st|vs|etc|e\.g|i\.e|no|approx)|\b[A-Z])\.$", re.IGNORECASE)
_CLAUSE = re.compile(r"(?<=[,;:—])\s+")


def _sentence_cuts(text: str) -> list[int]:
    return [m.end() for m in _END.finditer(text) if not _ABBREV.search(text[: m.start()].rstrip("\"')]"))]


def _clause_cut(text: str) -> re.Match[str] | None:
    """The first clause break with at least two words before it."""
    return next((m for m in _CLAUSE.finditer(text) if len(text[: m.start()].split()) >= 2), None)


def _first_clause(sentence: str, min_chars: int) -> list[str]:
    if len(sentence) <= min_chars:
        return [sentence]
    m = _clause_cut(sentence)
    if m is None or not sentence[m.end() :].strip():
        return [sentence]
    return [sentence[: m.start()].strip(), sentence[m.end() :].strip()]


def split_sentences(text: str, first_clause_chars: int = 24) -> list[str]:
    """Sentences of ``text``; the first one cut after its first clause when it is long."""
    text = " ".join(text.split())
    if not text:
        return []
    pieces, start = [], 0
    for cut in _sentence_cuts(text):
        pieces.append(text[start:cut].strip())
        start = cut
    if text[start:].strip():
        pieces.append(text[start:].strip())
    pieces = [p for p in pieces if any(c.isalnum() for c in p)]
    if pieces and first_clause_chars > 0:
        pieces = _first_clause(pieces[0], first_clause_chars) + pieces[1:]
    return pieces


class SentenceStream:
    """Feed tokens, get back each piece as soon as it is complete; ``flush`` the rest."""

    def __init__(self, first_clause_chars: int = 24) -> None:
        self.first_clause_chars = first_clause_chars
        self._buf = ""
        self._first = True

    def feed(self, token: str) -> list[str]:
        self._buf += token
        out: list[str] = []
        if self._first and self.first_clause_chars > 0:
            m = _clause_cut(self._buf)
            cuts = _sentence_cuts(self._buf)
            if m and (not cuts or m.start() < cuts[0]):
                if len(self._buf) > self.first_clause_chars:
                    out.append(self._buf[: m.start()].strip())
                    self._buf = self._buf[m.end() :]
                    self._first = False
        cuts = _sentence_cuts(self._buf)
        if cuts:
            start = 0
            for cut in cuts:
                piece = self._buf[start:cut].strip()
                if any(c.isalnum() for c in piece):
                    out.append(piece)
                start = cut
            self._buf = self._buf[start:]
        if out:
            self._first = False
        return out

    def flush(self) -> list[str]:
        rest, self._buf = self._buf.strip(), ""
        return [rest] if any(c.isalnum() for c in rest) else []
