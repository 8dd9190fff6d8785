import json

import pytest
import torch

from gmsa import GMSA
from gmsa.model import set_stage
from gmsa.training.config import TrainConfig
from gmsa.training.data import BatchStream, Example, epoch_batches
from gmsa.training.trainer import Trainer, cosine_lr

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and its largest city.",
    "Group merging averages the hidden states of consecutive tokens.",
    "A compressed context can answer many questions without being read again.",
]


@pytest.fixture
def ae_files(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 4))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:2]))
    return train, val


def tiny_config(backbone_dir, ae_files, out_dir, **overrides) -> TrainConfig:
    train, val = ae_files
    values = dict(
        backbone=str(backbone_dir),
        data=str(train),
        val_data=str(val),
        out_dir=str(out_dir),
        k_enc=2,
        lora_r=4,
        lora_alpha=8,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=6,
        eval_every=0,
        eval_examples=2,
        save_every_min=1000,
        rates=[2, 4],
        min_tokens=1,
        dtype="float32",  # exact comparisons; "auto" is tested on its own
        ae_decoder_lora=0,  # the paper's frozen decoder unless a test asks for the AE decoder LoRA
        lsa_match_embedding_scale=True,
    )
    return TrainConfig.from_dict(values | overrides)


def test_ae_loss_on_a_fixed_batch_falls_by_half(make_gmsa, backbone_dir):
    gmsa = make_gmsa(backbone_dir)
    set_stage(gmsa.model, "ae")
    gmsa.model.train()
    tok = gmsa.tokenizer
    prompt = tok(gmsa.config.ae_prompt, add_special_tokens=False)["input_ids"]
    examples = [
        Example(ids, prompt, ids + [tok.eos_token_id]) for ids in tok(SENTENCES, add_special_tokens=False)["input_ids"]
    ]
    batch = next(iter(BatchStream(examples, 4, (2,), tok.pad_token_id)))
    optimizer = torch.optim.AdamW([p for p in gmsa.model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = gmsa.model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2, losses[::8]


def test_resume_continues_exactly(backbone_dir, ae_files, tmp_path):
    straight = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "straight"))
    straight.run()
    first = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "split", stop_at_step=3))
    first.run()
    resumed = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "split"))
    resumed.run()
    assert resumed.step == straight.step == 6
    for name, tensor in straight.optimizer.state_dict()["state"].items():
        assert torch.allclose(tensor["exp_avg"], resumed.optimizer.state_dict()["state"][name]["exp_avg"], atol=1e-6)
    a = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, a[name], atol=1e-6), name
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "split" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "split" / "exact" / "optimizer.safetensors").is_file()
    assert not list((tmp_path / "split").rglob("*.pt"))  # no pickles


def test_validation_reports_loss_and_bleu(backbone_dir, ae_files, tmp_path):
    trainer = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "run", max_steps=2, eval_every=2))
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_bleu_x2" in r]
    assert len(val) == 1 and 0.0 <= val[0]["val_bleu_x4"] <= 1.0 and val[0]["val_loss_x2"] > 0
    assert isinstance(val[0]["val_info_x2"], float)


def test_keft_from_ae_checkpoint_trains_only_the_decoder(backbone_dir, ae_files, tmp_path):
    Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "ae", max_steps=1)).run()
    qa = tmp_path / "qa.jsonl"
    row = {"context": SENTENCES[1], "question": "What is the capital of France?", "answers": ["Paris"]}
    qa.write_text((json.dumps(row) + "\n") * 8)
    cfg = tiny_config(
        backbone_dir,
        (qa, qa),
        tmp_path / "keft",
        stage="keft",
        init=str(tmp_path / "ae" / "model"),
        decoder_tuning="qkv",
        max_steps=2,
        max_tokens=4096,
    )
    trainer = Trainer(cfg)
    assert trainer.gmsa.config.max_context_tokens == 4096  # the AE checkpoint's window was 2048
    lsa_before = {n: p.clone() for n, p in trainer.model.lsa.named_parameters()}
    trainer.run()
    assert all(torch.equal(p, lsa_before[n]) for n, p in trainer.model.lsa.named_parameters())
    assert trainer.gmsa.config.decoder_tuning == "qkv"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "keft" / "model" / "model.safetensors")
    assert any(k.startswith("decoder.") and "q_proj" in k for k in saved)


def test_ae_decoder_lora_trains_with_the_encoder_and_is_saved(backbone_dir, ae_files, tmp_path):
    trainer = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "ae", max_steps=2, ae_decoder_lora=4))
    decoder_lora = {n: p.clone() for n, p in trainer.model.decoder.named_parameters() if "lora_B" in n}
    assert decoder_lora and all(p.requires_grad for n, p in trainer.model.decoder.named_parameters() if "lora_" in n)
    trainer.run()
    after = dict(trainer.model.decoder.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in decoder_lora.items())
    reloaded = GMSA.from_pretrained(tmp_path / "ae" / "model")
    assert reloaded.config.decoder_tuning == "none" and reloaded.config.ae_decoder_lora_r == 4
    reloaded_lora = dict(reloaded.model.decoder.named_parameters())
    assert all(torch.equal(reloaded_lora[n].float(), p.bfloat16().float()) for n, p in after.items() if ".ae." in n)


def test_keft_adds_its_own_adapter_and_leaves_the_ae_adapter_frozen(backbone_dir, ae_files, tmp_path):
    Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "ae", max_steps=2, ae_decoder_lora=4)).run()
    qa = tmp_path / "qa.jsonl"
    row = {"context": SENTENCES[1], "question": "What is the capital of France?", "answers": ["Paris"]}
    qa.write_text((json.dumps(row) + "\n") * 8)
    init = str(tmp_path / "ae" / "model")
    cfg = tiny_config(backbone_dir, (qa, qa), tmp_path / "keft", stage="keft", init=init, decoder_tuning="lora")
    keft = Trainer(cfg)
    ae_before = {n: p.clone() for n, p in keft.model.decoder.named_parameters() if ".ae." in n}
    trainable = {n for n, p in keft.model.decoder.named_parameters() if p.requires_grad}
    assert ae_before and trainable and all(".default." in n for n in trainable)
    keft.run()
    assert all(torch.equal(p, ae_before[n]) for n, p in keft.model.decoder.named_parameters() if ".ae." in n)
    saved = GMSA.from_pretrained(tmp_path / "keft" / "model")
    names = [n for n, _ in saved.model.decoder.named_parameters() if "lora_" in n]
    assert any(".ae." in n for n in names) and any(".default." in n for n in names)


def test_cosine_schedule_warms_up_then_decays():
    values = [cosine_lr(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(values[10:], values[11:]))


def test_epoch_batches_are_seeded_and_cover_everything():
    lengths = [(i * 37) % 50 for i in range(50)]
    a = epoch_batches(lengths, 4, seed=0, epoch=0, bucket=3)
    assert a == epoch_batches(lengths, 4, seed=0, epoch=0, bucket=3)
    assert a != epoch_batches(lengths, 4, seed=0, epoch=1, bucket=3)
    assert sorted(i for batch in a for i in batch) == list(range(50))
    # within a bucket of 3 batches, lengths are sorted, so a batch spans a narrow range
    assert sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) < 50 * 4


def test_keep_every_writes_loadable_snapshots(backbone_dir, ae_files, tmp_path):
    Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "run", max_steps=4, keep_every=2)).run()
    snapshots = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snapshots == ["step-2", "step-4"]
    assert GMSA.from_pretrained(tmp_path / "run" / "snapshots" / "step-2", backbone=str(backbone_dir)) is not None


def test_bf16_holds_frozen_weights_in_bf16_and_trains_fp32_ones(backbone_dir, ae_files, tmp_path):
    trainer = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "bf16", max_steps=2, dtype="bfloat16"))
    params = dict(trainer.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for n, p in params.items() if not p.requires_grad and "decoder." in n)
    before = {n: p.clone() for n, p in params.items() if p.requires_grad}
    trainer.run()
    assert any(not torch.equal(params[n], p) for n, p in before.items())


def test_auto_dtype_is_measured_and_reported(backbone_dir, ae_files, tmp_path):
    trainer = Trainer(tiny_config(backbone_dir, ae_files, tmp_path / "auto", max_steps=1, dtype="auto"))
    assert trainer.compute.dtype in {torch.float32, torch.bfloat16}
    assert "than fp32" in trainer.compute.reason or "speed of fp32" in trainer.compute.reason
