import pytest
import torch

from gmsa.evaluation.information import Information, shifted, soft_token_information
from gmsa.model import set_stage
from gmsa.training.data import Example, collate
from tests.training.test_train import SENTENCES


def ae_examples(gmsa) -> list[Example]:
    tok = gmsa.tokenizer
    prompt = tok(gmsa.config.ae_prompt, add_special_tokens=False)["input_ids"]
    ids = tok(SENTENCES, add_special_tokens=False)["input_ids"]
    return [Example(context, prompt, context + [tok.eos_token_id]) for context in ids]


def test_shift_pairs_each_target_with_the_next_context():
    examples = [Example([i], [9], [i, 0]) for i in range(3)]
    assert [(e.context, e.target) for e in shifted(examples)] == [([1], [0, 0]), ([2], [1, 0]), ([0], [2, 0])]


def test_information_is_the_gap_between_mismatched_and_matched():
    assert Information(matched=2.5, mismatched=3.0).nats_per_token == pytest.approx(0.5)


def test_matched_loss_is_the_token_mean_over_all_batches(make_gmsa, backbone_dir):
    gmsa = make_gmsa(backbone_dir)
    gmsa.model.eval()
    examples = ae_examples(gmsa)
    pad = gmsa.tokenizer.pad_token_id
    whole = collate(examples, [2] * len(examples), pad)
    with torch.no_grad():
        expected = gmsa.model(**whole).item()
        control = gmsa.model(**collate(shifted(examples), [2] * len(examples), pad)).item()
    result = soft_token_information(gmsa.model, examples, rate=2, pad_id=pad, batch_size=3)
    assert result.matched == pytest.approx(expected, rel=1e-5)
    assert result.mismatched == pytest.approx(control, rel=1e-5)


def test_training_the_autoencoder_makes_soft_tokens_informative(make_gmsa, backbone_dir):
    gmsa = make_gmsa(backbone_dir)
    set_stage(gmsa.model, "ae")
    examples = ae_examples(gmsa)
    pad = gmsa.tokenizer.pad_token_id
    before = soft_token_information(gmsa.model, examples, rate=2, pad_id=pad).nats_per_token
    batch = collate(examples, [2] * len(examples), pad)
    optimizer = torch.optim.AdamW([p for p in gmsa.model.parameters() if p.requires_grad], lr=3e-3)
    gmsa.model.train()
    for _ in range(40):
        gmsa.model(**batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    gmsa.model.eval()
    after = soft_token_information(gmsa.model, examples, rate=2, pad_id=pad).nats_per_token
    assert after > before + 0.5, (before, after)


def test_the_control_needs_two_examples(tiny_gmsa):
    with pytest.raises(ValueError, match="two examples"):
        soft_token_information(tiny_gmsa.model, ae_examples(tiny_gmsa)[:1], rate=2, pad_id=0)
