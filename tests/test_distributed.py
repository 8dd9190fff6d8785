"""``gmsa train`` under torchrun: 2 CPU ranks (gloo) against one process on the same global batch."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gmsa.data import BatchStream, Example
from gmsa.distributed import Context
from gmsa.model import trained_state_dict
from gmsa.train import Trainer
from tests.test_train import SENTENCES, tiny_config

REPO = Path(__file__).resolve().parents[1]

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from gmsa import distributed
    from gmsa.model import trained_state_dict
    from gmsa.train import TrainConfig, Trainer

    out = sys.argv[1]
    for values in json.loads(sys.argv[2]):
        trainer = Trainer(TrainConfig(**values))
        trainer.run()
        weights = trained_state_dict(trainer.model)
        if trainer.probe is not None:
            weights["probe.maps"] = trainer.probe.maps.detach()
        torch.save(weights, f"{values['out_dir']}/rank{trainer.dist.rank}.pt")
    distributed.teardown(trainer.dist)
    """
)


@pytest.fixture
def mixed_files(tmp_path):
    """Passages of different lengths, so ranks see unequal token counts."""
    texts = [" ".join(SENTENCES[: 1 + i % 4]) for i in range(24)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return train, train


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
    assert not list((tmp_path / "ddp").glob("state.pt.tmp"))


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
