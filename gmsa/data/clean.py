"""Text normalisation, sentence splitting and detokenisation.

Everything here is a pure function on strings so it is easy to test.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# --------------------------------------------------------------------------
# Unicode / whitespace normalisation
# --------------------------------------------------------------------------

# Characters that cp1252 maps into 0x80-0x9f; a UTF-8 byte decoded as cp1252
# turns into one of these (or into a C1 control char when decoded as latin-1).
_CP1252_EXTRA = "€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"
_MOJIBAKE_RUN = re.compile("[\u00c2-\u00f4][\u0080-\u00bf" + re.escape(_CP1252_EXTRA) + "]{1,3}")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u00ad\u200b\u200c\u200d\u2060\ufeff"))
_SPACES = re.compile(r"[ \t\f\v\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def _mojibake_byte(ch: str) -> int | None:
    """The byte a UTF-8 byte turned into ``ch`` when misread as cp1252/latin-1."""
    try:
        return ch.encode("cp1252")[0]
    except UnicodeEncodeError:
        return ord(ch) if ord(ch) < 256 else None


def fix_mojibake(text: str) -> str:
    """Repair UTF-8 text that was decoded as cp1252/latin-1 (``â€œ`` -> ``“``).

    Only runs that decode cleanly as UTF-8 are replaced, so genuine accented
    text is left alone.
    """

    def repl(m: re.Match[str]) -> str:
        raw = [_mojibake_byte(c) for c in m.group(0)]
        if None in raw:
            return m.group(0)
        for end in range(len(raw), 1, -1):  # longest prefix that decodes
            try:
                fixed = bytes(raw[:end]).decode("utf-8")  # type: ignore[arg-type]
            except UnicodeDecodeError:
                continue
            return fixed + m.group(0)[end:]
        return m.group(0)

    return _MOJIBAKE_RUN.sub(repl, text)


def normalize_text(text: str) -> str:
    """Normalise unicode and whitespace, keeping paragraph breaks.

    Fixes mojibake, applies NFC, drops zero-width and control characters,
    collapses runs of spaces, strips each line and collapses blank lines so
    paragraphs are separated by exactly one empty line.
    """
    text = fix_mojibake(text)
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_ZERO_WIDTH)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    lines = [line.strip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_paragraphs(text: str) -> list[str]:
    """Split on blank lines; single newlines inside a paragraph become spaces."""
    paras = (re.sub(r"\s*\n\s*", " ", p).strip() for p in re.split(r"\n\s*\n", text))
    return [p for p in paras if p]


def dedup_key(text: str) -> str:
    """A key that is equal for texts differing only in case/punctuation/spacing."""
    return re.sub(r"[\W_]+", "", text.lower())


# --------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------

# fmt: off
_ABBREVIATIONS = frozenset([
    "mr", "mrs", "ms", "messrs", "mme", "mlle", "dr", "prof", "sr", "jr", "st", "mt", "ft", "gen", "gov", "sen",
    "rep", "reps", "col", "capt", "cmdr", "lt", "sgt", "maj", "adm", "rev", "hon", "pres", "supt", "insp",
    "vs", "etc", "e.g", "i.e", "cf", "al", "viz", "no", "nos", "vol", "vols", "fig", "figs", "pp", "ch", "sec",
    "art", "arts", "inc", "co", "corp", "ltd", "bros", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "u.s", "u.k", "u.n", "a.m", "p.m", "b.c", "a.d", "d.c", "n.y", "ph.d", "op",
    "approx", "dept", "est", "esq", "univ", "ave", "blvd",
])
# fmt: on
# A sentence end: terminal punctuation, optional closing quotes/brackets,
# whitespace, then something that can start a sentence.
_BOUNDARY = re.compile(r"([.!?…]+[\"'”’)\]]*)\s+(?=[\"'“‘(\[]*[A-Z0-9])")
_LAST_WORD = re.compile(r"([\w.]+)[.]$")


def _is_abbreviation(chunk: str) -> bool:
    """True if ``chunk`` (text up to and incl. a full stop) ends in an abbreviation."""
    m = _LAST_WORD.search(chunk)
    if not m:
        return False
    word = m.group(1).lower()
    if word in _ABBREVIATIONS:
        return True
    # Initials ("J. Smith", "U.S.A.") and single letters.
    return bool(re.fullmatch(r"(?:[a-z]\.)*[a-z]", word))


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences with a rule-based splitter.

    Splits after ``.``, ``!``, ``?`` (plus closing quotes/brackets) followed by
    whitespace and an upper-case letter, digit or opening quote, except after
    common abbreviations and initials.
    """
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(paragraph):
        end = m.end(1)
        chunk = paragraph[start:end]
        if m.group(1) == "." and _is_abbreviation(chunk):
            continue
        sentences.append(chunk.strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


# --------------------------------------------------------------------------
# Detokenisation (Brown corpus, SQuAD-style tokenised passages)
# --------------------------------------------------------------------------

_NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "%", "...", "'s", "n't"}
_NO_SPACE_AFTER = {"(", "[", "{", "$", "#"}
_TERMINALS = {".", ";", "!", "?", ":"}
_CLITICS = {"'s", "'re", "'ve", "'d", "'ll", "'m", "n't", "'S", "N'T"}


def detokenize(tokens: Iterable[str]) -> str:
    """Join Penn/Brown-style tokens into normal text.

    Handles ````/''`` quotes (converted to ``"``), punctuation attachment,
    brackets, clitics (``do n't`` -> ``don't``) and straight double quotes
    (alternating open/close).
    """
    out: list[str] = []
    glue_next = True  # no space before the next token
    open_double = open_single = False
    prev = ""
    for tok in tokens:
        if tok in _TERMINALS and (tok == prev or (tok == "." and prev.endswith("."))):
            continue  # Brown doubles sentence-final marks: "boost ; ;", "Jr. ."
        prev = tok
        if tok == "`":
            tok, kind = "'", "open"
        elif tok == "'":
            kind = "close" if open_single else "open"
            open_single = not open_single
        elif tok == "``":
            tok, kind = '"', "open"
        elif tok == "''":
            tok, kind = '"', "close"
        elif tok == '"':
            kind = "close" if open_double else "open"
        else:
            kind = ""
        if kind == "open":
            open_double = open_double or tok == '"'
            out.append(tok if glue_next else " " + tok)
            glue_next = True
            continue
        if kind == "close":
            open_double = open_double and tok != '"'
            out.append(tok)
            glue_next = False
            continue
        attach = glue_next or tok in _NO_SPACE_BEFORE or tok in _CLITICS
        out.append(tok if attach else " " + tok)
        glue_next = tok in _NO_SPACE_AFTER
    return "".join(out).strip()


_SPACED_PUNCT = re.compile(r" ([.,;:!?%)\]}])")
_SPACED_OPEN = re.compile(r"([(\[{$]) ")
_SPACED_APOS = re.compile(r"(\w) ' (s|re|ve|d|ll|m|t)\b")
_SPACED_NT = re.compile(r"(\w) n't\b")
_SPACED_NUM = re.compile(r"(\d) ([.,]) (\d)")
_SPACED_HYPHEN = re.compile(r"(\w) ([-–/]) (\w)")
_SPACED_QUOTE = re.compile(r'" ([^"]*?) "')


def detokenize_text(text: str) -> str:
    """Undo whitespace tokenisation in a string (``Earth ' s`` -> ``Earth's``).

    Used for the SQuAD-style passages of Disfl-QA, where every token is
    separated by a space.
    """
    text = _SPACED_NUM.sub(r"\1\2\3", text)
    text = _SPACED_APOS.sub(r"\1'\2", text)
    text = _SPACED_NT.sub(r"\1n't", text)
    text = _SPACED_HYPHEN.sub(r"\1\2\3", text)
    text = _SPACED_QUOTE.sub(r'"\1"', text)
    text = _SPACED_PUNCT.sub(r"\1", text)
    text = _SPACED_OPEN.sub(r"\1", text)
    return re.sub(r" {2,}", " ", text).strip()
