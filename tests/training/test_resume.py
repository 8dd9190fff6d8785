"""Resume states without pickles: exact (local exact/), from a fresh clone (model/ + resume.json), legacy state.pt."""

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from gmsa.cli import main as cli_main
from gmsa.model import trained_state_dict
from gmsa.training import resume
from gmsa.training.config import TrainConfig
from gmsa.training.trainer import Trainer, cosine_lr
from tests.training.test_train import ae_files, tiny_config  # noqa: F401  (ae_files is a fixture)

REPO = Path(__file__).resolve().parents[2]
MODEL_KEYS = ("backbone", "k_enc", "lora_r", "lora_alpha", "lsa_match_embedding_scale", "ae_prompt")
TRACKED = ("model", "resume.json", "metrics.jsonl")  # what a resume point keeps in git


@pytest.fixture
def split_run(backbone_dir, ae_files, tmp_path):  # noqa: F811
    """A run stopped at step 3 of 6."""
    Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "split", stop_at_step=3)).run()
    return tmp_path / "split"


def clone_of(run, dest):
    """What a fresh clone has of a run: the tracked files only, no exact/."""
    dest.mkdir()
    for name in TRACKED:
        (shutil.copytree if (run / name).is_dir() else shutil.copyfile)(run / name, dest / name)
    return dest


def files_in(directory):
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def test_fresh_clone_resumes_from_committed_weights_without_writing_there(backbone_dir, ae_files, split_run, tmp_path):  # noqa: F811
    shipped = clone_of(split_run, tmp_path / "shipped")
    before = files_in(shipped)
    cfg = tiny_config(backbone_dir, ae_files, tmp_path / "runs" / "ae", resume_from=str(shipped), rewarm_steps=2)
    trainer = Trainer(cfg)
    assert trainer.resume() and trainer.step == 3 and trainer.rewarm_from == 3
    assert trainer.optimizer.state_dict()["state"] == {}  # moments re-warmed, not restored
    # the lr ramps up again over rewarm_steps=2: half the schedule's value at the first resumed step
    assert trainer._lr_factor(3) == pytest.approx(0.5 * cosine_lr(3, cfg.warmup_steps, cfg.max_steps, 0.1))
    assert trainer._lr_factor(4) == pytest.approx(cosine_lr(4, cfg.warmup_steps, cfg.max_steps, 0.1))
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.step == 6 and files_in(shipped) == before
    rows = [json.loads(line) for line in (tmp_path / "runs" / "ae" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the shipped curve, continued
    assert json.loads((tmp_path / "runs" / "ae" / "resume.json").read_text())["step"] == 6


def test_resume_point_weights_must_match_resume_json(split_run, tmp_path):
    shipped = clone_of(split_run, tmp_path / "shipped")
    counters = json.loads((shipped / "resume.json").read_text())
    (shipped / "resume.json").write_text(json.dumps(counters | {"model_sha256": "0" * 64}))
    with pytest.raises(ValueError, match="does not match"):
        resume.read(shipped)


def test_max_steps_at_or_below_the_resumed_step_exits_non_zero(backbone_dir, ae_files, split_run, capsys):  # noqa: F811
    cfg = tiny_config(backbone_dir, ae_files, split_run, max_steps=3)
    with pytest.raises(ValueError, match="already at step 3 >= max_steps=3"):
        Trainer(cfg).run()
    overrides = [f"{k}={json.dumps(v)}" for k, v in dataclasses.asdict(cfg).items() if k not in ("stage", "model")]
    overrides += [f"model.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(cfg.model).items() if v is not None]
    assert cli_main(["train", "ae", *overrides]) == 2
    assert "nothing to train" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stop_at_step=2 is at or below"):
        Trainer(tiny_config(backbone_dir, ae_files, split_run, stop_at_step=2)).run()


def test_missing_data_file_suggests_data_prepare(backbone_dir, ae_files, tmp_path):  # noqa: F811
    cfg = tiny_config(backbone_dir, ae_files, tmp_path / "run", data=str(tmp_path / "data" / "ae" / "train.jsonl"))
    with pytest.raises(FileNotFoundError, match="gmsa data prepare"):
        Trainer(cfg)


def test_resume_from_must_hold_a_state(backbone_dir, ae_files, tmp_path):  # noqa: F811
    cfg = tiny_config(backbone_dir, ae_files, tmp_path / "run", resume_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="holds no resume.json"):
        Trainer(cfg).run()


def test_a_run_written_before_the_model_table_resumes_exactly(backbone_dir, ae_files, split_run, tmp_path):  # noqa: F811
    """A run directory of the code before the [model] table: a flat config in resume.json and exact/state.json."""
    cfg = tiny_config(backbone_dir, ae_files, split_run)
    flat = json.loads((REPO / "checkpoints" / "ae" / "resume.json").read_text())["config"]  # the old field names
    flat |= {key: value for key, value in dataclasses.asdict(cfg).items() if key in flat}
    flat |= {key: getattr(cfg.model, key) for key in MODEL_KEYS}
    flat |= {"ae_decoder_lora": 0, "decoder_tuning": "qkv"}
    for path in (split_run / "resume.json", split_run / "exact" / "state.json"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"config": flat}))
    assert TrainConfig.from_dict(flat).model_config() == cfg.model_config()
    resumed = Trainer(cfg)
    assert resumed.resume() and resumed.step == 3 and resumed.optimizer.state_dict()["state"]  # exact: moments
    resumed.run()
    rows = [json.loads(line) for line in (split_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    straight = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "straight"))
    straight.run()
    assert resumed.step == straight.step == 6
    reference = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, reference[name], atol=1e-6), name
    assert "model" in json.loads((split_run / "resume.json").read_text())["config"]  # written in the new form


def test_legacy_state_pt_is_read_without_unsafe_pickles(backbone_dir, ae_files, split_run, tmp_path):  # noqa: F811
    exact = resume.read(split_run)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    counters = exact.counters
    state = {key: counters[key] for key in ("step", "elapsed", "tokens_seen", "cap", "position", "scheduler")}
    version, internal, gauss = counters["rng"]["python"]
    rng = {"torch": torch.get_rng_state(), "python": (version, tuple(internal), gauss)}
    state |= {"trained": exact.trained, "optimizer": exact.optimizer, "rng": rng, "config": counters["config"]}
    torch.save(state, legacy / "state.pt")
    trainer = Trainer(tiny_config(backbone_dir, ae_files, legacy))
    assert trainer.resume() and trainer.step == 3 and trainer.optimizer.state_dict()["state"]
    for name, tensor in trained_state_dict(trainer.model).items():
        assert torch.equal(tensor, exact.trained[name]), name


def test_publish_ships_no_optimizer_and_never_moves_backwards(split_run, tmp_path):
    dest = tmp_path / "checkpoints" / "ae"
    report = resume.publish(split_run, dest)
    assert report["step"] == 3 and report["metrics_rows"] == 3
    assert sorted(p.name for p in dest.iterdir()) == ["metrics.jsonl.gz", "model", "resume.json"]
    assert resume.read(dest).exact is False and "exact" not in resume.read(dest).source
    assert resume.read_metrics(dest) == (split_run / "metrics.jsonl").read_text()
    counters = json.loads((dest / "resume.json").read_text())
    (dest / "resume.json").write_text(json.dumps(counters | {"step": 99}))
    with pytest.raises(ValueError, match="ahead of"):
        resume.publish(split_run, dest)
    assert resume.main(["publish", str(split_run), str(dest), "--force"]) == 0


def test_rng_state_round_trips_through_json():
    random.seed(5)
    torch.manual_seed(5)
    saved = json.loads(json.dumps(resume.rng_state()))
    expected = (random.random(), torch.rand(3))
    random.seed(0)
    torch.manual_seed(0)
    resume.set_rng_state(saved)
    assert random.random() == expected[0] and torch.equal(torch.rand(3), expected[1])


def test_gzipped_metrics_read_like_plain_ones(split_run, tmp_path):
    from gmsa.training.data import read_jsonl

    dest = tmp_path / "shipped"
    resume.publish(split_run, dest)
    assert read_jsonl(dest / "metrics.jsonl.gz") == read_jsonl(split_run / "metrics.jsonl")


def test_resume_point_can_share_the_weights_of_a_checkpoint_built_on_it(backbone_dir, ae_files, split_run, tmp_path):  # noqa: F811
    from safetensors.torch import load_file, save_file

    shipped = tmp_path / "shipped"
    shutil.copytree(split_run / "model", shipped)
    weights = load_file(shipped / "model.safetensors")
    extra = "decoder.model.layers.0.self_attn.q_proj.lora_A.default.weight"  # a KEFT adapter built on top
    save_file(weights | {extra: torch.zeros(2, 2, dtype=torch.bfloat16)}, shipped / "model.safetensors")

    info = resume.publish(split_run, tmp_path / "point", weights_in=shipped)
    assert not (tmp_path / "point" / "model").exists() and info["weights_in"] == "../shipped"
    state = resume.read(tmp_path / "point")
    assert set(state.trained) == set(weights) and not state.exact

    trainer = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "cont", resume_from=str(tmp_path / "point")))
    trainer.run()
    assert trainer.step == 6

    save_file({k: v + 1 for k, v in weights.items()}, shipped / "model.safetensors")
    with pytest.raises(ValueError, match="was not built on"):
        resume.publish(split_run, tmp_path / "other", weights_in=shipped)
