"""Reading members of downloaded archives (.tgz, .whl/.zip, .deb) without unpacking them."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

Member = tuple[str, bytes]


def iter_tar(path: Path | io.BytesIO, keep: Callable[[str], bool], mode: str = "r:*") -> Iterator[Member]:
    """Yield ``(name, bytes)`` for regular files in a tar archive whose name passes ``keep``."""
    kwargs = {"fileobj": path} if isinstance(path, io.BytesIO) else {"name": str(path)}
    with tarfile.open(mode=mode, **kwargs) as tf:  # type: ignore[call-overload]
        for m in tf:
            if m.isfile() and keep(m.name):
                f = tf.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def iter_zip(path: Path, keep: Callable[[str], bool]) -> Iterator[Member]:
    """Yield ``(name, bytes)`` for files in a zip/wheel whose name passes ``keep``, sorted by name."""
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith("/") and keep(name):
                yield name, zf.read(name)


def deb_data_tar(path: Path) -> io.BytesIO:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{path} is not a Debian package (ar archive)")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            return io.BytesIO(body)
        pos += 60 + size + (size % 2)
    raise ValueError(f"{path} has no data.tar member")


def iter_deb(path: Path, keep: Callable[[str], bool]) -> Iterator[Member]:
    """Yield ``(name, bytes)`` for files inside a ``.deb`` whose name passes ``keep``."""
    yield from iter_tar(deb_data_tar(path), keep)
