"""Cutting reply text into speakable pieces: sentences, with the first piece early.

TTS latency is paid per piece, so the first piece should be short: when the first sentence is
long, its first clause goes out on its own, or, with no clause break in sight, its first
``first_words`` words (Kokoro's time grows with the audio it makes: ~0.3 s a second of speech on
2 cores). No piece is much longer than ``max_chars`` where a clause break allows:
a piece's synthesis cannot be cut short, so a Stop or a barge-in waits for it (one of 190
characters took 11 s on a busy 2-core laptop, measured live, and the person's next turn waited
that long). Works on a finished text (:func:`split_sentences`) and on a token stream
(:class:`SentenceStream`); both cut the same text the same way.
"""

from __future__ import annotations

import re

# A sentence ends at . ! ? … (and closing quotes/brackets) followed by whitespace; not after a
# single capital ("J. Smith"), common abbreviations, or inside a number ("3.5").
_END = re.compile(r"""(?<=[.!?…])["')\]]*\s+""")
_ABBREV = re.compile(r"(?:\b(?:mr|mrs|ms|dr|st|vs|etc|e\.g|i\.e|no|approx)|\b[A-Z])\.$", re.IGNORECASE)
_CLAUSE = re.compile(r"(?<=[,;:—])\s+")
_WORD = re.compile(r"\S+")
# words that lean on the next one: a piece that ends on one sounds cut off
_LEANING = frozenset(
    "a an the to of in on at by for from with as than and or but so that which who is are was were be "
    "my your our their his her its this these those i you we they not can will would".split()
)
# where a long clause may be cut for want of punctuation: before a conjunction
_JOIN = re.compile(r"\s+(?=(?:and|but|or|so|because|while|which|although|though|whereas|until|unless)\s)")


def timestamp(seconds: float, decimal: str) -> str:
    """``HH:MM:SS,mmm`` (SRT, ``decimal=","``) or ``HH:MM:SS.mmm`` (WebVTT, ``"."``)."""
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


def _sentence_cuts(text: str) -> list[int]:
    return [m.end() for m in _END.finditer(text) if not _ABBREV.search(text[: m.start()].rstrip("\"')]"))]


def _speakable(piece: str) -> bool:
    return any(c.isalnum() for c in piece)


def _first_cut(text: str, min_chars: int, first_words: int, complete: bool) -> tuple[int, int] | None:
    """Where the first piece of ``text`` ends and the rest begins, if it should be cut early:
    at a clause break within ``first_words`` + 1 words, else after ``first_words`` words, moved
    back past words that lean on the next one ("a city that" → "a city"), down to three, or
    else on by up to two ("I would not" → "I would not start"); with no such place, not cut.
    At least one word is left for the rest.

    ``complete``: ``text`` is all there is (else more tokens may follow).
    """
    cuts = _sentence_cuts(text)
    end = cuts[0] if cuts else (len(text) if complete else None)
    sentence = text[:end] if end is not None else text
    if len(sentence.strip()) <= min_chars:
        return None
    longest = first_words + 1 if first_words > 0 else len(sentence)
    for m in _CLAUSE.finditer(sentence):
        n = len(sentence[: m.start()].split())
        if n > longest:
            break
        if n >= 2 and (end is None or _speakable(sentence[m.end() :])):
            return m.start(), m.end()
    return _word_cut(list(_WORD.finditer(sentence)), first_words, complete or end is not None)


def _word_cut(words: list[re.Match], first_words: int, complete: bool) -> tuple[int, int] | None:
    """After ``first_words`` words, or back to three, or on by two: the first place whose last
    word does not lean on the next. A word is whole once the next one has begun (or the text
    is ``complete``); a place is taken once the word after it is whole too, so that a clause
    break there has been seen: a stream is cut where the whole text would be."""
    if first_words <= 0:
        return None
    whole = len(words) if complete else len(words) - 1
    for k in (*range(first_words, 2, -1), first_words + 1, first_words + 2):
        if k >= len(words) or k + 1 > whole:
            return None  # wait for more words (or the sentence is too short to cut there)
        if words[k - 1].group().lower() not in _LEANING:
            return words[k - 1].end(), words[k].start()
    return None


def _clause_cuts(text: str, max_chars: int, slack: int = 0) -> tuple[list[str], str]:
    """``text`` (a sentence, or the start of one: then ``slack`` more characters are waited for,
    so a break near ``max_chars`` is seen whole) cut into pieces of at most ``max_chars`` where
    a break allows: (pieces, the rest). The last clause break (, ; : —) within ``max_chars``,
    else the last conjunction, else the first break of either kind after it."""
    out: list[str] = []
    while max_chars > 0 and len(text.strip()) > max_chars + slack:
        found = [[(m.start(), m.end()) for m in rx.finditer(text) if len(text[: m.start()].split()) >= 3]
                 for rx in (_CLAUSE, _JOIN)]
        within = [[b for b in kind if b[0] <= max_chars] for kind in found]
        cut = within[0][-1] if within[0] else within[1][-1] if within[1] else min(found[0] + found[1], default=None)
        if cut is None:
            break
        out.append(text[: cut[0]].strip())
        text = text[cut[1] :]
    return out, text


def split_sentences(text: str, first_clause_chars: int = 24, first_words: int = 0, max_chars: int = 0) -> list[str]:
    """Sentences of ``text``; the first one cut early when it is long, any cut at clause breaks
    beyond ``max_chars`` (0: never)."""
    stream = SentenceStream(first_clause_chars, first_words, max_chars)
    return stream.feed(" ".join(text.split())) + stream.flush()


class SentenceStream:
    """Feed tokens, get back each piece as soon as it is complete; ``flush`` the rest."""

    def __init__(self, first_clause_chars: int = 24, first_words: int = 0, max_chars: int = 0) -> None:
        self.first_clause_chars = first_clause_chars
        self.first_words = first_words
        self.max_chars = max_chars
        self._buf = ""
        self._first = first_clause_chars > 0

    def feed(self, token: str) -> list[str]:
        self._buf += token
        return self._pieces(complete=False)

    def flush(self) -> list[str]:
        out = self._pieces(complete=True)
        rest, self._buf = self._buf.strip(), ""
        return out + ([rest] if _speakable(rest) else [])

    def _pieces(self, complete: bool) -> list[str]:
        out: list[str] = []
        if self._first:
            cut = _first_cut(self._buf, self.first_clause_chars, self.first_words, complete)
            if cut is not None:
                out.append(self._buf[: cut[0]].strip())
                self._buf = self._buf[cut[1] :]
                self._first = False
        start = 0
        for cut in _sentence_cuts(self._buf):
            pieces, rest = _clause_cuts(self._buf[start:cut], self.max_chars)
            for piece in [*pieces, rest.strip()]:
                if _speakable(piece):
                    out.append(piece)
                    self._first = False
            start = cut
        pieces, self._buf = _clause_cuts(self._buf[start:], self.max_chars, slack=12)  # a long sentence so far
        out += [p for p in pieces if _speakable(p)]
        self._first = self._first and not pieces
        return out


# --- comparing transcripts ------------------------------------------------------------------

_SMALL = "zero one two three four five six seven eight nine ten eleven twelve".split()
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def spoken_words(text: str) -> list[str]:
    """``text`` as the words a person said, for word error rates: lower case, no punctuation,
    hyphens split, small numbers spelled ("5" and "five" are one word), "%" as "percent"."""
    text = text.lower().replace("%", " percent ").replace("-", " ")
    return [_SMALL[int(w)] if w.isdigit() and int(w) < len(_SMALL) else w for w in _TOKEN.findall(text)]
