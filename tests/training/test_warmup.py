import json

import pytest
import torch

from gmsa.model import set_stage
from gmsa.training.data import collate
from gmsa.training.trainer import Trainer
from gmsa.training.warmup import TokenProbe, probe_accuracy, probe_logits, probe_loss, probe_scores, slot_targets
from tests.training.test_train import SENTENCES, ae_files, tiny_config  # noqa: F401  (ae_files is a fixture)


def test_slot_targets_follow_groups_rates_and_remainders():
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    targets, valid = slot_targets(ids, mask, torch.tensor([2, 4]), n_groups=3, max_rate=4)
    assert targets[0][valid[0]].tolist() == [10, 11, 12, 13, 14]
    assert valid[0].sum(dim=1).tolist() == [2, 2, 1]  # rate 2: slots 2-3 unused, last group holds one token
    assert targets[1][valid[1]].tolist() == [20, 21, 22]
    assert valid[1].sum(dim=1).tolist() == [3, 0, 0]


def test_probe_reads_every_real_token_once(make_gmsa, backbone_dir):
    gmsa = make_gmsa(backbone_dir)
    ids = gmsa.tokenizer(SENTENCES[:3], add_special_tokens=False)["input_ids"]
    batch = collate_contexts(ids, [2, 4, 3], gmsa.tokenizer.pad_token_id)
    logits, targets = probe_logits(gmsa.model, TokenProbe(gmsa.model.hidden_size, 4), batch)
    assert targets.tolist() == [t for row in ids for t in row]  # group by group, slot by slot
    assert logits.shape == (len(targets), gmsa.model.decoder.config.vocab_size)


def test_probe_loss_falls_and_trains_only_encoder_lora_lsa_and_probe(make_gmsa, backbone_dir):
    gmsa = make_gmsa(backbone_dir)
    set_stage(gmsa.model, "ae")
    probe = TokenProbe(gmsa.model.hidden_size, 4)
    ids = gmsa.tokenizer(SENTENCES, add_special_tokens=False)["input_ids"]
    batch = collate_contexts(ids, [4, 4, 2, 2], gmsa.tokenizer.pad_token_id)
    params = [p for p in gmsa.model.parameters() if p.requires_grad] + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    decoder_before = {n: p.clone() for n, p in gmsa.model.decoder.named_parameters()}
    before = probe_accuracy(gmsa.model, probe, batch)
    losses = []
    for _ in range(30):
        loss = probe_loss(gmsa.model, probe, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses[::6]
    assert probe_accuracy(gmsa.model, probe, batch) > before
    assert all(torch.equal(p, decoder_before[n]) for n, p in gmsa.model.decoder.named_parameters())


def test_probe_scores_give_the_loss_and_accuracy_of_one_pass(make_gmsa, backbone_dir):
    gmsa = make_gmsa(backbone_dir)
    probe = TokenProbe(gmsa.model.hidden_size, 4)
    ids = gmsa.tokenizer(SENTENCES, add_special_tokens=False)["input_ids"]
    batch = collate_contexts(ids, [4, 2, 4, 2], gmsa.tokenizer.pad_token_id)
    loss, accuracy = probe_scores(gmsa.model, probe, batch)
    assert loss == pytest.approx(probe_loss(gmsa.model, probe, batch).item(), rel=1e-5)
    assert accuracy == probe_accuracy(gmsa.model, probe, batch)


def test_warmup_stage_resumes_with_its_probe_and_feeds_the_ae_stage(backbone_dir, ae_files, tmp_path):  # noqa: F811
    cfg = dict(stage="warmup", max_steps=4, eval_every=4)
    Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "warm", stop_at_step=2, **cfg)).run()
    resumed = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "warm", **cfg))
    resumed.run()
    straight = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "straight", **cfg))
    straight.run()
    assert torch.allclose(resumed.probe.maps, straight.probe.maps, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= rows[-1]["val_probe_acc_x2"] <= 1.0
    ae = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "ae", init=str(tmp_path / "warm" / "model")))
    warm_lsa = dict(resumed.model.lsa.named_parameters())  # exported in bf16
    for name, param in ae.model.lsa.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, warm_lsa[name].to(torch.bfloat16).float()), name


def collate_contexts(ids: list[list[int]], rates: list[int], pad_id: int) -> dict:
    from gmsa.training.data import Example

    return collate([Example(row, [], []) for row in ids], rates, pad_id)
