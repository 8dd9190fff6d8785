"""Moving files through size-limited channels: split into parts with sha256 checksums, join and verify.

The accelerator machine (docs/accelerator.md) takes at most 64 MiB per call and returns at most 8
files of 16 MiB: the backbone and data travel to it as parts over several calls, and its checkpoint
comes back as parts. Standard library only, so it runs on any image::

    python -m gmsa.training.transport pack DIR OUT --name result --part-mib 15   # DIR -> OUT/result.part-NN + .json
    python -m gmsa.training.transport unpack OUT/result.json DEST    # verify every part, extract into DEST
    python -m gmsa.training.transport verify OUT/result.json         # check the parts only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import tempfile
from pathlib import Path

MIB = 1 << 20
CHUNK = 4 * MIB


class TransportError(ValueError):
    """A part is missing or does not match its checksum, or a manifest is unreadable."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def split(source: Path, out: Path, name: str, part_bytes: int) -> dict:
    """Cut ``source`` into ``out/{name}.part-NN`` of at most ``part_bytes``; write and return ``out/{name}.json``."""
    if part_bytes < 1:
        raise TransportError(f"part size must be positive, got {part_bytes}")
    out.mkdir(parents=True, exist_ok=True)
    whole, parts = hashlib.sha256(), []
    with open(source, "rb") as handle:
        while True:
            path = out / f"{name}.part-{len(parts):02d}"
            digest, size = hashlib.sha256(), 0
            with open(path, "wb") as part:
                while size < part_bytes and (block := handle.read(min(CHUNK, part_bytes - size))):
                    part.write(block)
                    digest.update(block)
                    whole.update(block)
                    size += len(block)
            if size == 0 and parts:
                path.unlink()
                break
            parts.append({"file": path.name, "bytes": size, "sha256": digest.hexdigest()})
            if size < part_bytes:
                break
    manifest = {"name": name, "bytes": sum(p["bytes"] for p in parts), "sha256": whole.hexdigest(), "parts": parts}
    (out / f"{name}.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
        manifest["parts"], manifest["sha256"]  # noqa: B018 - both keys must be there
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TransportError(f"{path}: not a readable parts manifest ({err})") from err
    return manifest


def missing_parts(manifest: dict, parts_dir: Path) -> list[str]:
    """The parts not (yet) in ``parts_dir``, by file name."""
    return [p["file"] for p in manifest["parts"] if not (Path(parts_dir) / p["file"]).is_file()]


def verify_part(manifest: dict, path: Path) -> None:
    """Raise unless ``path`` is one of the manifest's parts, with the right size and checksum."""
    entry = next((p for p in manifest["parts"] if p["file"] == Path(path).name), None)
    if entry is None:
        raise TransportError(f"{path} is not a part of {manifest['name']}")
    if Path(path).stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
        raise TransportError(f"{path} does not match its sha256 in the manifest: copy it again")


def join(manifest_path: Path, dest: Path, parts_dir: Path | None = None) -> Path:
    """Concatenate the verified parts into ``dest`` and check the whole file's sha256."""
    manifest = read_manifest(manifest_path)
    parts_dir = Path(parts_dir or Path(manifest_path).parent)
    if missing := missing_parts(manifest, parts_dir):
        raise TransportError(f"{manifest['name']}: missing parts {missing} in {parts_dir}")
    whole = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        for entry in manifest["parts"]:
            path = parts_dir / entry["file"]
            verify_part(manifest, path)
            with open(path, "rb") as handle:
                while block := handle.read(CHUNK):
                    out.write(block)
                    whole.update(block)
    if whole.hexdigest() != manifest["sha256"]:
        dest.unlink()
        raise TransportError(f"{manifest['name']}: the joined file does not match its sha256")
    return dest


def pack(directory: Path, out: Path, name: str, part_bytes: int) -> dict:
    """Tar ``directory`` (uncompressed: weights do not compress) and split the tar into parts."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / f"{name}.tar"
        with tarfile.open(archive, "w") as tar:
            for path in sorted(Path(directory).rglob("*")):
                tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
        return split(archive, out, name, part_bytes)


def unpack(manifest_path: Path, dest: Path, parts_dir: Path | None = None) -> Path:
    """Join and verify the parts, then extract the tar into ``dest`` (plain files and folders only)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = join(manifest_path, Path(tmp) / "joined.tar", parts_dir)
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmsa.training.transport", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("split", "pack"):
        p = sub.add_parser(command, help=f"{command} a {'file' if command == 'split' else 'directory'} into parts")
        p.add_argument("source", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--name", required=True)
        p.add_argument("--part-mib", type=float, default=15.0, help="largest part, MiB (default 15)")
    for command in ("join", "unpack"):
        p = sub.add_parser(command, help=f"verify the parts of a manifest and {command} them")
        p.add_argument("manifest", type=Path)
        p.add_argument("dest", type=Path)
        p.add_argument("--parts-dir", type=Path, default=None, help="where the parts are (default: beside it)")
    p = sub.add_parser("verify", help="check every part of a manifest")
    p.add_argument("manifest", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command in ("split", "pack"):
            func = split if args.command == "split" else pack
            manifest = func(args.source, args.out, args.name, int(args.part_mib * MIB))
            print(json.dumps({"parts": [p["file"] for p in manifest["parts"]], "bytes": manifest["bytes"]}))
        elif args.command == "verify":
            manifest = read_manifest(args.manifest)
            with tempfile.TemporaryDirectory() as tmp:
                join(args.manifest, Path(tmp) / "joined")
            print(f"{manifest['name']}: {len(manifest['parts'])} parts, {manifest['bytes']} bytes, sha256 ok")
        else:
            (join if args.command == "join" else unpack)(args.manifest, args.dest, args.parts_dir)
            print(f"{args.dest}: verified and {'joined' if args.command == 'join' else 'extracted'}")
    except (OSError, TransportError, tarfile.TarError) as err:
        print(f"gmsa.training.transport: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
