"""Synthetic extractive questions from prose by cloze translation (Lewis et al. 2019, arXiv 1906.04980).

A sentence of a passage loses a short answer span (a year, a counted number, a capitalised name of
1-4 words), which becomes a wh-word: "His father was an oboist in the Hanover Military Band." gives
"Where was his father an oboist?" (answer "Hanover Military Band"). When the sentence starts with
a subject and a form of "be" or a modal before the span, the wh-word moves to the front and the
auxiliary inverts; otherwise the wh-phrase stays in place ("... sent a minister to which place?").
The questions teach the KEFT decoder to find a short span in the soft tokens and copy it.

Only passages of the requested split (by :func:`gmsa.data.split.assign_split` of their document id)
are used, so questions over validation or test prose never reach training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from gmsa.data.clean import split_paragraphs, split_sentences
from gmsa.data.split import assign_split

SKIPPED_SOURCES = frozenset({"pydoc"})  # API documentation: code names, not prose spans
MAX_SPAN_WORDS = 4
MIN_SENTENCE_WORDS, MAX_SENTENCE_WORDS = 6, 45
YEAR = re.compile(r"^(1[5-9]\d\d|20\d\d)$")
NUMBER = re.compile(r"^\d{1,3}(,\d{3})*$|^\d+$")
NUMBER_WORDS = frozenset("two three four five six seven eight nine ten eleven twelve twenty thirty hundred".split())
CORE = re.compile(r"^([\"'(\[“‘]*)(.*?)([\"')\].,;:!?”’]*)$")
TITLES = frozenset(
    "mr mr. mrs mrs. ms ms. dr dr. miss sir lord lady king queen president general captain colonel senator "
    "governor judge professor father mother uncle aunt saint st st.".split()
)
SPEECH_VERBS = frozenset("said says told asked replied wrote declared answered cried whispered".split())
PLACE_PREPOSITIONS = frozenset("in at from to into near across throughout".split())
DROPPED_PREPOSITIONS = frozenset("in at on during".split())  # "in 1755" -> "When ..."; "from X" keeps "from"
DETERMINERS = frozenset({"the"})
NOT_NAMES = frozenset(
    "i i'm i'd i'll i've o oh god january february march april may june july august september october november "
    "december monday tuesday wednesday thursday friday saturday sunday".split()
)
CLAUSE_OPENERS = (
    PLACE_PREPOSITIONS
    | DROPPED_PREPOSITIONS
    | frozenset("after before by for with when if as although while since because then so but and or yet".split())
)
AUXILIARIES = frozenset("is are was were will would can could should may might must".split())
LOWERED_STARTS = frozenset(
    "he she it they we you the a an his her its their this that these those our my your there".split()
)


@dataclass(frozen=True)
class Word:
    """A whitespace token of a sentence: its core (punctuation stripped) and the core's offsets."""

    core: str
    start: int
    end: int
    lead: str  # opening punctuation before the core
    trail: str  # closing punctuation after the core


@dataclass(frozen=True)
class Span:
    """An answer candidate: words ``first..last`` of a sentence and its kind (year, number, place, person, name)."""

    first: int
    last: int
    kind: str


def words_of(sentence: str) -> list[Word]:
    """The whitespace tokens of ``sentence`` with their cores."""
    words = []
    for match in re.finditer(r"\S+", sentence):
        lead, core, trail = CORE.match(match.group()).groups()
        start = match.start() + len(lead)
        words.append(Word(core, start, start + len(core), lead, trail))
    return words


def is_capitalised(word: Word) -> bool:
    """A name-like word: upper-case initial, letters (and inner ``'``/``-``/``.``), not a stop word."""
    core = word.core
    plain = core.replace("'", "").replace("-", "").replace(".", "")
    return bool(core[:1].isupper() and plain.isalpha() and core.lower() not in NOT_NAMES | TITLES)


def candidate_spans(words: list[Word]) -> list[Span]:
    """Every answer span of a sentence: years, counted numbers and capitalised runs not at its start."""
    spans = [Span(i, i, kind) for i, word in enumerate(words) if (kind := number_kind(words, i))]
    i = 1  # the first word is capitalised anyway
    while i < len(words):
        if not is_capitalised(words[i]) or clause_start(words, i):
            i += 1
            continue
        last = run_end(words, i)
        if last - i < MAX_SPAN_WORDS:
            spans.append(Span(i, last, name_kind(words, i, last)))
        i = last + 1
    return spans


def number_kind(words: list[Word], i: int) -> str:
    """``"year"``, ``"number"`` (a count followed by a plain noun-like word) or ``""``."""
    word = words[i]
    if word.lead or (i > 0 and words[i - 1].core.endswith("$")):
        return ""
    if YEAR.match(word.core):
        return "year"
    counted = NUMBER.match(word.core) or word.core.lower() in NUMBER_WORDS
    following = words[i + 1] if i + 1 < len(words) else None
    if counted and not word.trail and following and following.core.isalpha() and following.core.islower():
        return "number"
    return ""


def clause_start(words: list[Word], i: int) -> bool:
    """Whether word ``i`` opens a quotation or follows a colon, where capitals say nothing."""
    return bool(words[i].lead) or words[i - 1].trail[-1:] in {":", '"', "“", "”"}


def run_end(words: list[Word], first: int) -> int:
    """The last word of the capitalised run from ``first``, bridging a lower-case "of" ("Empire of Brazil")."""
    last = first
    while not words[last].trail and last + 1 < len(words):
        following = words[last + 1]
        if is_capitalised(following) and not following.lead:
            last += 1
        elif following.core == "of" and not following.trail and last + 2 < len(words):
            after = words[last + 2]
            if not (is_capitalised(after) and not after.lead):
                break
            last += 2
        else:
            break
    return last


def name_kind(words: list[Word], first: int, last: int) -> str:
    """``"place"`` after a place preposition, ``"person"`` after a title or before a speech verb, else ``"name"``."""
    before = previous_word(words, first)
    if before in PLACE_PREPOSITIONS:
        return "place"
    after = words[last + 1].core.lower() if last + 1 < len(words) and not words[last].trail else ""
    if (first > 0 and is_title(words[first - 1])) or after in SPEECH_VERBS or (before == "by" and last > first):
        return "person"
    return "name"


def is_title(word: Word) -> bool:
    """ "Mr.", "President", "Captain": a word that makes the name after it a person's."""
    return word.core.lower() in TITLES and word.trail in {"", "."}


def is_determiner(word: Word) -> bool:
    """ "the" directly before a name, which the wh-phrase replaces too."""
    return word.core.lower() in DETERMINERS and not word.trail


def previous_word(words: list[Word], i: int) -> str:
    """The lower-cased word before ``i`` (skipping a determiner), ``""`` across punctuation or at the start."""
    j = i - 1
    if j >= 0 and is_determiner(words[j]):
        j -= 1
    return words[j].core.lower() if j >= 0 and not words[j].trail else ""


def wh_phrase(kind: str, following: str = "") -> str:
    """The wh-phrase that replaces a span of ``kind`` in place (``following``: the noun a number counts)."""
    if kind == "year":
        return "what year"
    if kind == "number":
        return f"how many {following}"
    if kind == "place":
        return "which place"
    return "who" if kind == "person" else "what"


def fronted_wh(kind: str, preposition: str, following: str = "") -> str:
    """The wh-word that opens a question whose span moved to the front."""
    if kind == "year":
        return "When" if preposition in DROPPED_PREPOSITIONS else "What year"
    if kind == "place":
        return "Where"
    return wh_phrase(kind, following).capitalize()


def question_for(sentence: str, words: list[Word], span: Span) -> str:
    """The question that ``span`` of ``sentence`` answers, ending with "?"."""
    first, last = replaced_range(words, span)
    opener = words[first].core.lower()
    preposition = opener if opener in PLACE_PREPOSITIONS | DROPPED_PREPOSITIONS else ""
    following = words[span.last + 1].core if span.kind == "number" else ""
    if span.kind == "number":
        last = span.last + 1  # "ten children" -> "how many children"
    fronted = front_question(sentence, words, span, first, last, preposition, following)
    if fronted:
        return fronted
    phrase = " ".join(filter(None, [preposition, wh_phrase(span.kind, following)]))
    text = sentence[: words[first].start] + phrase + sentence[words[last].end :]
    return finish(text)


def replaced_range(words: list[Word], span: Span) -> tuple[int, int]:
    """The words a wh-phrase replaces: the span, a determiner before it and a preposition before that."""
    first = span.first
    if first > 0 and (is_title(words[first - 1]) or is_determiner(words[first - 1])):
        first -= 1
    if span.kind in {"year", "place"} and first > 0 and not words[first - 1].trail:
        if words[first - 1].core.lower() in PLACE_PREPOSITIONS | DROPPED_PREPOSITIONS:
            first -= 1
    return first, span.last


def front_question(
    sentence: str, words: list[Word], span: Span, first: int, last: int, preposition: str, following: str
) -> str:
    """``Wh aux subject rest?`` when the sentence opens with a short subject and an auxiliary; else ``""``."""
    aux = next((i for i, w in enumerate(words[:8]) if w.core.lower() in AUXILIARIES), None)
    if aux is None or aux == 0 or aux >= first or any(w.trail or w.lead for w in words[:aux]):
        return ""
    if words[0].core.lower() in CLAUSE_OPENERS or any(number_kind(words, i) for i in range(aux)):
        return ""  # "In 1755 the regiment was ...": the words before the auxiliary are not its subject
    if any(w.trail in {",", ";", ":"} for w in words[aux:first]):
        return ""  # the span sits in another clause
    stranded = preposition if preposition and preposition not in DROPPED_PREPOSITIONS else ""
    subject = sentence[words[0].start : words[aux - 1].end]
    if words[0].core.lower() in LOWERED_STARTS:
        subject = subject[:1].lower() + subject[1:]
    middle = sentence[words[aux].end : words[first].start].strip()
    tail = sentence[words[last].end :].strip()
    parts = [fronted_wh(span.kind, preposition, following), words[aux].core.lower(), subject, middle, tail, stranded]
    if span.kind in {"place", "year"}:
        parts = parts[:-1]  # "Where was he sent?" rather than "... sent to?"
    return finish(" ".join(part for part in parts if part))


def finish(text: str) -> str:
    """``text`` as a question: trailing punctuation and spaces replaced by one "?"."""
    text = re.sub(r"\s+([,;:])", r"\1", re.sub(r"\s+", " ", text)).strip()
    text = re.sub(r"[\s.,;:!?\"'”’)]+$", "", text)
    return text[:1].upper() + text[1:] + "?"


def sentence_questions(sentence: str) -> list[tuple[Span, str, str]]:
    """``(span, question, answer)`` for every usable span of one sentence."""
    words = words_of(sentence)
    if not MIN_SENTENCE_WORDS <= len(words) <= MAX_SENTENCE_WORDS:
        return []
    out = []
    for span in candidate_spans(words):
        answer = sentence[words[span.first].start : words[span.last].end]
        question = question_for(sentence, words, span)
        if answer.lower() not in question.lower() and len(question.split()) >= 4:
            out.append((span, question, answer))
    return out


def passage_sentences(text: str) -> Iterator[str]:
    """The sentences of a passage, paragraph by paragraph."""
    for paragraph in split_paragraphs(text):
        yield from split_sentences(paragraph)


def cloze_row(row: dict, rng: random.Random) -> dict | None:
    """One cloze question over an AE row's passage (a kind drawn first, so names do not crowd out numbers)."""
    candidates = [item for sentence in passage_sentences(row["text"]) for item in sentence_questions(sentence)]
    if not candidates:
        return None
    kinds = sorted({span.kind for span, _, _ in candidates})
    kind = rng.choice(kinds)
    _, question, answer = rng.choice([item for item in candidates if item[0].kind == kind])
    return {
        "context": row["text"],
        "question": question,
        "answers": [answer],
        "source": "cloze",
        "doc_id": row["doc_id"],
        "n_tokens": row.get("n_tokens", 0),
        "cloze_kind": kind,
    }


def cloze_rows(
    rows: Iterable[dict], n: int, seed: int = 0, split: str = "train", split_seed: int = 0, max_tokens: int = 384
) -> list[dict]:
    """Up to ``n`` cloze rows, one per passage, from prose rows of ``split`` only (seeded, order-independent).

    ``split_seed`` is the seed ``gmsa data prepare`` split the documents with; rows of another split are
    skipped whichever file they come from, as are passages over ``max_tokens`` backbone tokens.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    usable = [
        row
        for row in rows
        if row.get("source") not in SKIPPED_SOURCES
        and row.get("n_tokens", 0) <= max_tokens
        and assign_split(row["doc_id"], split_seed) == split
    ]
    rng = random.Random(seed)
    usable.sort(key=lambda row: (row["doc_id"], row["text"]))
    rng.shuffle(usable)
    out = []
    for row in usable:
        made = cloze_row(row, random.Random(f"{seed}:{row['doc_id']}:{row['text'][:64]}"))
        if made:
            out.append(made)
            if len(out) == n:
                break
    return out
