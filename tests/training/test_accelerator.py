"""benchmarks/accelerator.sh: the payload transport, the step planning, and the whole dry run on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmsa import GMSA
from gmsa.training import transport
from gmsa.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accelerator = load("accelerator")
payload = load("accelerator_payload")


def test_planned_steps_fill_the_budget_and_charge_longer_curriculum_caps():
    cfg = TrainConfig(max_tokens=256, curriculum={"0": 64, "10": 128})
    assert accelerator.planned_steps(TrainConfig(max_tokens=64), 0, 1.0, 64, 100.0) == 100
    # 10 steps at 1 s, then each step at cap 128 costs 2 s: 10 + 45 steps in 100 s
    assert accelerator.planned_steps(cfg, 0, 1.0, 64, 100.0) == 55
    assert accelerator.planned_steps(cfg, 20, 1.0, 64, 10.0) == 25


def test_beats_shipped_compares_the_same_rate():
    row = lambda model, rate, **m: {"method": "gmsa", "model": model, "rate": rate, "metrics": m}  # noqa: E731
    qa = {
        "rows": [row("new", 4, f1=30.0), row("shipped", 4, f1=20.0), row("new", 8, f1=5.0), row("shipped", 8, f1=9.0)]
    }
    rec = {"error": "gmsa eval reconstruct exited 1"}
    assert accelerator.beats_shipped(qa, rec) == {"qa_f1_x4": True, "qa_f1_x8": False}


def test_stash_keeps_verified_parts_and_names_the_missing(tmp_path):
    blob = tmp_path / "payload.tar"
    blob.write_bytes(os.urandom(3000))
    accel = tmp_path / "accel"
    transport.split(blob, accel, "payload", 1000)
    carried = tmp_path / "call1"
    carried.mkdir()
    for name in ("payload.json", "payload.part-00"):
        (carried / name).write_bytes((accel / name).read_bytes())
    store = tmp_path / "stash"
    assert payload.stash(carried, store) == ["payload.part-01", "payload.part-02"]
    (carried / "payload.part-00").unlink()
    (carried / "payload.part-01").write_bytes(b"not the part")
    with pytest.raises(payload.transport.TransportError, match="payload.part-01 does not match"):
        payload.stash(carried, store)


def test_room_beside_the_tracked_tree_is_what_a_call_has_left():
    room = payload.room_bytes(REPO)
    assert 4 * transport.MIB <= room <= 64 * transport.MIB - payload.tree_bytes(REPO)


@pytest.mark.slow
def test_dry_run_leaves_a_loadable_checkpoint_in_small_parts(tmp_path):
    out = tmp_path / "out"
    before = sorted((REPO / ".accel").glob("*")) if (REPO / ".accel").is_dir() else []
    env = os.environ | {"OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "benchmarks/accelerator.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.stat().st_size <= 16 * transport.MIB for f in files), files
    assert {"checkpoint.json", "results.json", "log.txt"} <= {f.name for f in files}
    back = tmp_path / "back"
    assert transport.main(["unpack", str(out / "checkpoint.json"), str(back)]) == 0
    gmsa = GMSA.from_pretrained(back / "keft" / "model")
    keft = TrainConfig.from_sources([str(REPO / "configs" / "keft.toml")])
    assert gmsa.config.decoder_tuning == keft.model.decoder_tuning
    results = json.loads((out / "results.json").read_text())
    assert results["ae"]["steps"] == results["keft"]["steps"] == 3
    assert "rows" in results["qa"] and "rows" in results["reconstruct"], results
    assert not (back / "ae" / "exact").exists() and (back / "ae" / "resume.json").is_file()
    assert (back / "ae" / "metrics.jsonl").is_file() and (back / "keft" / "metrics.jsonl").is_file()  # the curves
    after = sorted((REPO / ".accel").glob("*")) if (REPO / ".accel").is_dir() else []
    assert after == before  # a dry run packs into a temporary folder, never into the real .accel/


def test_backbone_fingerprint_does_not_depend_on_the_transformers_version(tiny_gmsa, monkeypatch):
    import transformers.configuration_utils as configuration_utils

    from gmsa.backbone import fingerprint

    decoder = tiny_gmsa.model.decoder
    ours = fingerprint(decoder)
    monkeypatch.setattr(configuration_utils, "__version__", "5.17.0")  # the accelerator image's
    assert '"transformers_version": "5.17.0"' in decoder.config.to_json_string(use_diff=False)
    assert fingerprint(decoder) == ours == tiny_gmsa.config.backbone_fingerprint
