"""``gmsa train`` under torchrun: 2 CPU ranks (gloo), DDP and FSDP, against one process on the same global batch."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gmsa.model import trained_state_dict
from gmsa.training.config import TrainConfig
from gmsa.training.data import BatchStream, Example
from gmsa.training.distributed import Context
from gmsa.training.trainer import Trainer
from tests.training.test_train import SENTENCES, tiny_config

REPO = Path(__file__).resolve().parents[2]

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from gmsa.training import distributed
    from gmsa.model import trained_state_dict
    from gmsa.training.config import TrainConfig
    from gmsa.training.trainer import Trainer

    out = sys.argv[1]
    for values in json.loads(sys.argv[2]):
        trainer = Trainer(TrainConfig.from_dict(values))
        trainer.run()
        weights = trained_state_dict(trainer.model)
        if trainer.probe is not None:
            weights["probe.maps"] = trainer.probe.maps.detach()
        weights = distributed.gathered(weights)  # FSDP shards -> full tensors, on every rank
        torch.save(weights, f"{values['out_dir']}/rank{trainer.dist.rank}.pt")
    distributed.teardown(trainer.dist)
    """
)


def write_mixed(root: Path) -> tuple[Path, Path]:
    """Passages of different lengths, so ranks see unequal token counts."""
    texts = [" ".join(SENTENCES[: 1 + i % 4]) for i in range(24)]
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return train, train


@pytest.fixture
def mixed_files(tmp_path):
    return write_mixed(tmp_path)


def run_two_ranks(configs: list, tmp_path: Path) -> None:
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = launcher + [str(script), str(tmp_path), json.dumps([dataclasses.asdict(c) for c in configs])]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("stage", ["ae", "warmup"])
def test_two_ranks_match_one_process_on_the_same_global_batch(stage, backbone_dir, mixed_files, tmp_path):
    # no dropout: its masks differ between ranks by design
    common = dict(stage=stage, max_steps=3, grad_accum=2, threads=1, device="cpu", eval_every=0, lora_dropout=0.0)
    two = tiny_config(backbone_dir, mixed_files, tmp_path / "ddp", batch_size=2, **common)
    run_two_ranks([two], tmp_path)  # 2 ranks x 2 examples x 2 micro-batches
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks drifted apart"

    single = Trainer(tiny_config(backbone_dir, mixed_files, tmp_path / "one", batch_size=4, **common))
    single.run()
    alone = trained_state_dict(single.model)
    if single.probe is not None:
        alone["probe.maps"] = single.probe.maps.detach()
    for name, tensor in alone.items():
        assert torch.allclose(rank0[name], tensor, atol=2e-5, rtol=1e-4), name
    ddp_rows = read_rows(tmp_path / "ddp")
    one_rows = read_rows(tmp_path / "one")
    assert [r["loss"] for r in ddp_rows] == pytest.approx([r["loss"] for r in one_rows], abs=1e-3)
    assert [r["tokens_seen"] for r in ddp_rows] == [r["tokens_seen"] for r in one_rows]
    assert not list((tmp_path / "ddp").glob("*.tmp")) and (tmp_path / "ddp" / "resume.json").is_file()


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_ranks_split_each_global_batch_without_overlap():
    examples = [Example([i] * (1 + i % 5), [], [0]) for i in range(40)]
    streams = [BatchStream(examples, 3, (4, 8), 0, seed=1, rank=r, world=2) for r in range(2)]
    whole = BatchStream(examples, 6, (4, 8), 0, seed=1)
    for _, a, b, both in zip(range(10), *map(iter, streams), iter(whole)):
        assert a["context_ids"].shape[0] + b["context_ids"].shape[0] == both["context_ids"].shape[0]
        assert sorted(a["rates"].tolist() + b["rates"].tolist()) == sorted(both["rates"].tolist())


def test_single_process_context_is_a_no_op():
    context = Context()
    assert context.is_main and not context.active
    assert context.sum([1.0, 2.0]) == [1.0, 2.0]
    assert context.any(True) and not context.any(False)


# ---------------------------------------------------------------- FSDP
FSDP_COMMON = dict(max_steps=4, grad_accum=2, threads=1, device="cpu", lora_dropout=0.0, parallel="fsdp")


@pytest.fixture(scope="module")
def fsdp_runs(backbone_dir, tmp_path_factory) -> Path:
    """Every FSDP run the tests below compare, in one torchrun launch, and their single-process twins.

    A small ``clip`` makes gradient clipping act on every step, so the sharded norm is checked too.
    """
    root = tmp_path_factory.mktemp("fsdp")
    mixed = write_mixed(root)
    qa = root / "qa.jsonl"
    rows = [{"context": s, "question": "What is said?", "answers": [s.split()[1]]} for s in SENTENCES]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    keft = dict(stage="keft", init=str(root / "ae" / "model"), decoder_tuning="qkv", max_steps=2)

    def config(name: str, batch_size: int = 2, files=mixed, **extra):
        return tiny_config(backbone_dir, files, root / name, batch_size=batch_size, clip=0.05, **FSDP_COMMON | extra)

    Trainer(config("from_one", batch_size=4, stop_at_step=2)).run()  # a single-process checkpoint for FSDP
    two = [
        config("ae", eval_every=2),  # validation under FSDP: all ranks, loss only
        config("split", stop_at_step=2),
        config("split"),
        config("from_one"),
        config("to_one", stop_at_step=2),
        config("keft", files=(qa, qa), **keft),
    ]
    run_two_ranks(two, root)
    for run in (config("to_one", batch_size=4), config("one", batch_size=4), config("one_keft", 4, (qa, qa), **keft)):
        trainer = Trainer(run)
        trainer.run()
        torch.save(trained_state_dict(trainer.model), Path(run.out_dir) / "rank0.pt")
    return root


def assert_same_weights(a: Path, b: Path, atol: float = 1e-4) -> None:
    """The runs' trained weights agree to 3% of one Adam step (lr 3e-3 in these tiny configs).

    Sharded and single-process runs sum gradients in different orders, and fp32 kernels differ
    across CPUs (up to 2.6e-5 after 4 steps on an AVX-512 Xeon); Adam turns such rounding into a
    small fraction of a step. A wrong batch split changes the gradients themselves, not their rounding.
    """
    first, second = torch.load(a / "rank0.pt"), torch.load(b / "rank0.pt")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.allclose(tensor, second[name], atol=atol, rtol=1e-4), (a.name, b.name, name)


def test_fsdp_ranks_match_one_process_on_the_same_global_batch(fsdp_runs):
    rank0, rank1 = (torch.load(fsdp_runs / "ae" / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert_same_weights(fsdp_runs / "ae", fsdp_runs / "one")
    fsdp_rows, one_rows = read_rows(fsdp_runs / "ae"), read_rows(fsdp_runs / "one")
    train_rows = [r for r in fsdp_rows if "loss" in r]
    assert [r["loss"] for r in train_rows] == pytest.approx([r["loss"] for r in one_rows], abs=1e-3)
    assert [r["tokens_seen"] for r in train_rows] == [r["tokens_seen"] for r in one_rows]
    validations = [r for r in fsdp_rows if "val_loss_x2" in r]
    assert [r["step"] for r in validations] == [2, 4] and not any("val_bleu_x2" in r for r in validations)


def test_fsdp_keft_qkv_matches_one_process(fsdp_runs):
    assert_same_weights(fsdp_runs / "keft", fsdp_runs / "one_keft")
    saved = torch.load(fsdp_runs / "keft" / "rank0.pt")
    assert any(k.startswith("decoder.") and "q_proj" in k for k in saved)


def test_fsdp_checkpoints_resume_exactly_and_across_modes(fsdp_runs):
    assert_same_weights(fsdp_runs / "split", fsdp_runs / "ae", atol=1e-6)  # FSDP stop at 2 -> FSDP resume
    assert_same_weights(fsdp_runs / "from_one", fsdp_runs / "ae")  # one process -> FSDP
    assert_same_weights(fsdp_runs / "to_one", fsdp_runs / "one")  # FSDP -> one process
    assert [r["step"] for r in read_rows(fsdp_runs / "split")] == [1, 2, 3, 4]
    state = load_file(fsdp_runs / "split" / "exact" / "trained.safetensors")
    single = load_file(fsdp_runs / "one" / "exact" / "trained.safetensors")
    assert state.keys() == single.keys()
    moments = load_file(fsdp_runs / "split" / "exact" / "optimizer.safetensors")
    assert moments.keys() == load_file(fsdp_runs / "one" / "exact" / "optimizer.safetensors").keys()
    assert (fsdp_runs / "split" / "model" / "model.safetensors").is_file()


def test_unknown_parallel_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="parallel must be one of"):
        Trainer(TrainConfig(parallel="zero3", out_dir=str(tmp_path)))
