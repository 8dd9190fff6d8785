"""The Python 3.11 documentation sources (Debian ``python3.11-doc``, reST, PSF licence).

The reST sources (``_sources/**/*.rst.txt``) are turned into plain prose with
code: headings become short paragraphs, inline roles lose their markup
(``:func:`os.path.join``` -> ``os.path.join``), object directives keep their
signature, version notes are rendered as Sphinx does ("New in version 3.11."),
tables, indexes, comments and link targets are dropped, and literal blocks,
``code-block`` directives and doctests are kept as code paragraphs (one
unit each, newlines preserved, never sentence-split).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from gmsa.data.archive import iter_deb
from gmsa.data.base import Document
from gmsa.data.clean import normalize_text, split_sentences

SOURCE = "pydoc"
SOURCES_DIR = "usr/share/doc/python3.11/html/_sources/"
SKIP_PAGES = ("whatsnew/changelog", "license", "copyright", "contents", "bugs", "genindex")

Block = tuple[str, str]  # ("prose" | "code", text)

_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(.*)$")
_ADORNMENT = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}\s*$")
_BULLET = re.compile(r"^(?:[*+\-•]|#\.|\d+\.|\(?[a-z0-9]\)|[a-z]\.)\s+")
_OPTION = re.compile(r"^:[\w -]+:")
_DROP = {
    "index", "toctree", "highlight", "module", "currentmodule", "moduleauthor",
    "sectionauthor", "csv-table", "list-table", "table", "image", "figure", "raw",
    "only", "include", "literalinclude", "productionlist", "testsetup", "testcleanup",
    "audit-event-table", "pdb-command", "opcode", "tabularcolumns", "cssclass",
    "limited-api-list", "availability", "audit-event", "c:macro", "c:var", "c:type",
}  # fmt: skip
_CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput"}
_VERSION = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(lines: list[str]) -> list[str]:
    """Remove the common indentation of non-blank lines."""
    widths = [_indent(line) for line in lines if line.strip()]
    cut = min(widths) if widths else 0
    return [line[cut:] for line in lines]


def _take_indented(lines: list[str], i: int) -> tuple[list[str], int]:
    """Lines from ``i`` that are blank or indented (a directive/list body); return (body, next i)."""
    j = i
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > 0):
        j += 1
    while j > i and not lines[j - 1].strip():  # leave trailing blanks
        j -= 1
    return lines[i:j], j


def _role(m: re.Match[str]) -> str:
    text = m.group(1)
    target = re.fullmatch(r"(.*?)\s*<([^<>]*)>", text, re.DOTALL)
    if target:
        text = target.group(1) or target.group(2)
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text.lstrip("!.")


_INLINE = [
    (re.compile(r"\s*\[#\w*\]_"), ""),
    (re.compile(r"\[\d+\]_"), ""),
    (re.compile(r"``(.+?)``"), r"\1"),
    (re.compile(r"`([^`<]+?)\s*<[^>`]*>`__?"), r"\1"),
    (re.compile(r"`<([^>`]*)>`__?"), r"\1"),
    (re.compile(r"`([^`]+)`__?"), r"\1"),
    (re.compile(r"`([^`]+)`"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*\\])\*(\S[^*]*?)\*(?![\w*])"), r"\1"),
    (re.compile(r"\|(\w[^|]*)\|"), r"\1"),
    (re.compile(r"\\(.)"), r"\1"),
]
_ROLE = re.compile(r":(?:[\w-]+:)*[\w-]+:`([^`]*)`")


def strip_inline(text: str) -> str:
    """Remove reST inline markup from a line of prose."""
    text = _ROLE.sub(_role, text)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


def _prose(lines: list[str]) -> Block:
    return ("prose", strip_inline(" ".join(line.strip() for line in lines)))


def _code(lines: list[str]) -> Block:
    return ("code", "\n".join(line.rstrip() for line in _dedent(lines)).strip("\n"))


def _directive(name: str, arg: str, body: list[str]) -> list[Block]:
    """Render one directive with its (dedented) body."""
    while body and _OPTION.match(body[0].strip()):  # directive options
        body = body[1:]
    if name in _DROP or name.startswith(("c:", "py:")) and name.endswith(("macro", "var", "type")):
        return []
    if name in _CODE:
        return [_code(body)] if any(line.strip() for line in body) else []
    if name in _VERSION:
        version, _, rest = arg.partition(" ")
        inner = parse_rst("\n".join([rest, *body])) if (rest or body) else []
        lead = f"{_VERSION[name]} {version}" + (":" if inner else ".")
        if inner and inner[0][0] == "prose":
            return [("prose", f"{lead} {inner[0][1]}"), *inner[1:]]
        return [("prose", lead), *inner]
    head: list[Block] = [("prose", strip_inline(arg))] if arg and name not in {"note", "warning"} else []
    return head + parse_rst("\n".join(body))


def _is_table(line: str) -> bool:
    s = line.strip()
    return s.startswith(("+-", "+=")) or bool(re.fullmatch(r"=+( +=+)+", s))


def parse_rst(text: str) -> list[Block]:
    """Parse reST into prose and code blocks (see the module docstring)."""
    lines = _dedent(text.expandtabs(8).split("\n"))
    blocks: list[Block] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        s = line.strip()
        if not s:
            i += 1
        elif _indent(line) > 0:  # block quote / definition body
            body, i = _take_indented(lines, i)
            blocks += parse_rst("\n".join(body))
        elif m := _DIRECTIVE.match(s):
            body, i = _take_indented(lines, i + 1)
            blocks += _directive(m.group(1).lower(), m.group(2).strip(), _dedent(body))
        elif s.startswith(".."):  # comment or link target
            _, i = _take_indented(lines, i + 1)
        elif i + 1 < n and _ADORNMENT.match(lines[i + 1]) and not _ADORNMENT.match(s):
            blocks.append(("prose", strip_inline(s)))  # section title
            i += 2
        elif _ADORNMENT.match(s) and not _is_table(s):
            i += 1  # transition or overline
        elif _is_table(s):
            while i < n and lines[i].strip():
                i += 1
        elif s.startswith(">>>"):
            j = i
            while j < n and lines[j].strip():
                j += 1
            blocks.append(_code(lines[i:j]))
            i = j
        elif bullet := _BULLET.match(line):
            first = line[bullet.end() :]
            body, i = _take_indented(lines, i + 1)
            blocks += parse_rst("\n".join([first, *_dedent(body)]))
        else:
            j = i
            while j < n and lines[j].strip() and _indent(lines[j]) == 0 and not _DIRECTIVE.match(lines[j]):
                j += 1
            para = lines[i:j]
            i = j
            literal = para[-1].rstrip().endswith("::")
            if literal:
                last = para[-1].rstrip()[:-2].rstrip()
                para = para[:-1] + ([last + ":"] if last else [])
            if para:
                blocks.append(_prose(para))
            if literal:
                k = i
                while k < n and not lines[k].strip():
                    k += 1
                if k < n and _indent(lines[k]) > 0:
                    body, i = _take_indented(lines, k)
                    blocks.append(_code(body))
    return [(kind, t) for kind, t in blocks if t.strip()]


def page_document(name: str, text: str) -> Document:
    """One ``.rst.txt`` page -> a document of prose paragraphs (sentences) and code paragraphs."""
    paragraphs: list[tuple[str, ...]] = []
    for kind, body in parse_rst(text):
        if kind == "code":
            paragraphs.append((body,))
        else:
            sents = split_sentences(normalize_text(body))
            if sents:
                paragraphs.append(tuple(sents))
    page = name.split(SOURCES_DIR, 1)[-1].removesuffix(".rst.txt")
    return Document(f"{SOURCE}/{page}", SOURCE, tuple(paragraphs))


def _keep(name: str) -> bool:
    if SOURCES_DIR not in name or not name.endswith(".rst.txt"):
        return False
    page = name.split(SOURCES_DIR, 1)[-1].removesuffix(".rst.txt")
    return page not in SKIP_PAGES


def iter_documents(archive: Path) -> Iterator[Document]:
    """All documentation pages (minus changelog/licence/index pages), in path order."""
    for name, data in sorted(iter_deb(archive, _keep)):
        yield page_document(name, data.decode("utf-8"))
