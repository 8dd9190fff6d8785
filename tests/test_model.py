import pytest
import torch

from gmsa.model import TensorsState, base_model, set_stage, trained_state_dict
from gmsa.training.data import Example, collate


def _batch(gmsa, texts, rates):
    ids = gmsa.tokenizer(texts, add_special_tokens=False)["input_ids"]
    prompt = gmsa.tokenizer(gmsa.config.ae_prompt, add_special_tokens=False)["input_ids"]
    examples = [Example(row, prompt, row + [gmsa.tokenizer.eos_token_id]) for row in ids]
    return collate(examples, rates, gmsa.tokenizer.pad_token_id), examples


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Group merging averages the hidden states of consecutive tokens and the fox jumps.",
]


def test_encoder_and_lsa_are_copies_of_the_first_layers(backbone_dir, make_gmsa):
    gmsa = make_gmsa(backbone_dir, k_enc=3, k_lsa=2, lsa_match_embedding_scale=False)
    decoder_layers = base_model(gmsa.model.decoder).layers
    lsa_layers = gmsa.model.lsa.blocks.layers
    assert len(lsa_layers) == 2 and len(gmsa.model.encoder.layers) == 3
    for copy, original in zip(lsa_layers, decoder_layers):
        for (name, a), (_, b) in zip(copy.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), name
    # the LSA norm is the decoder's final norm; both are copies, not shared tensors
    assert torch.equal(gmsa.model.lsa.blocks.norm.weight, base_model(gmsa.model.decoder).norm.weight)
    assert (
        gmsa.model.lsa.blocks.layers[0].mlp.up_proj.weight.data_ptr() != decoder_layers[0].mlp.up_proj.weight.data_ptr()
    )
    # the backbone is loaded once: encoder + LSA hold only their few layers, no extra vocab
    assert gmsa.model.encoder.embed_tokens.weight.shape[0] == 1


def soft_rms(gmsa) -> float:
    batch, _ = _batch(gmsa, TEXTS, [2, 2, 2])
    with torch.no_grad():
        soft, mask = gmsa.model.compress(batch["context_ids"], batch["context_mask"], 2)
    return soft[mask.bool()].pow(2).mean(-1).sqrt().mean().item()


def test_lsa_output_starts_at_embedding_scale(backbone_dir, make_gmsa):
    gmsa = make_gmsa(backbone_dir)
    embedding_rms = gmsa.model.decoder.get_input_embeddings().weight.pow(2).mean(-1).sqrt().mean().item()
    assert embedding_rms / 1.5 < soft_rms(gmsa) < embedding_rms * 1.5
    unscaled = make_gmsa(backbone_dir, lsa_match_embedding_scale=False)
    assert soft_rms(unscaled) > 3 * embedding_rms


def test_stage_trainables(backbone_dir, make_gmsa):
    gmsa = make_gmsa(backbone_dir, decoder_tuning="qkv")
    ae = set_stage(gmsa.model, "ae")
    assert ae and all(n.startswith("encoder.") and "lora_" in n or n.startswith("lsa.") for n in ae)
    assert any(n.startswith("lsa.") for n in ae) and not any("embed_tokens" in n for n in ae)
    keft = set_stage(gmsa.model, "keft")
    assert keft and all(n.startswith("decoder.") and any(p in n for p in ("q_proj", "k_proj", "v_proj")) for n in keft)
    assert not any("o_proj" in n or "embed" in n for n in keft)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_keft_modes_train_only_the_decoder(backbone_dir, mode, make_gmsa):
    gmsa = make_gmsa(backbone_dir, decoder_tuning=mode)
    names = set_stage(gmsa.model, "keft")
    assert names and all(n.startswith("decoder.") for n in names)
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    if mode == "lora":
        assert all("lora_" in n for n in names)
    saved = trained_state_dict(gmsa.model)
    assert {f"{n}" for n in names} <= set(saved)


def test_keft_needs_a_decoder_mode(backbone_dir, make_gmsa):
    with pytest.raises(ValueError, match="decoder_tuning"):
        set_stage(make_gmsa(backbone_dir).model, "keft")


@pytest.mark.parametrize("family_fixture", ["backbone_dir", "qwen_dir"])
def test_batched_equals_one_by_one(request, family_fixture, make_gmsa):
    gmsa = make_gmsa(request.getfixturevalue(family_fixture))
    rates = [4, 2, 8]
    batch, examples = _batch(gmsa, TEXTS, rates)
    with torch.no_grad():
        soft, mask = gmsa.model.compress(batch["context_ids"], batch["context_mask"], batch["rates"])
        batch_loss = gmsa.model(**batch)
        losses, weights = [], []
        for i, example in enumerate(examples):
            single = collate([example], [rates[i]], gmsa.tokenizer.pad_token_id)
            alone, _ = gmsa.model.compress(single["context_ids"], single["context_mask"], rates[i])
            n = alone.shape[1]
            assert mask[i].sum() == n
            assert torch.allclose(soft[i, :n], alone[0], atol=1e-5)
            losses.append(gmsa.model(**single))
            weights.append(len(example.target))
    expected = sum(loss * w for loss, w in zip(losses, weights)) / sum(weights)
    assert batch_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_too_many_layers_is_refused(backbone_dir, make_gmsa):
    with pytest.raises(ValueError, match="exceed"):
        make_gmsa(backbone_dir, k_enc=9)


@pytest.mark.parametrize("variant", ["linear", "random"])
def test_lsa_ablations_build_and_run(backbone_dir, variant, make_gmsa):
    gmsa = make_gmsa(backbone_dir, lsa_init=variant)
    batch, _ = _batch(gmsa, TEXTS, [4, 4, 4])
    loss = gmsa.model(**batch)
    assert torch.isfinite(loss)


def test_backbone_fingerprint_ignores_a_decoder_lora(make_gmsa, backbone_dir):
    from gmsa.backbone import fingerprint
    from gmsa.model import enable_decoder_tuning

    gmsa = make_gmsa(backbone_dir)
    before = fingerprint(gmsa.model.decoder)
    enable_decoder_tuning(gmsa.model, "lora")
    assert fingerprint(gmsa.model.decoder) == before == gmsa.config.backbone_fingerprint


# ----------------------------------------------------------------- the inference encoder
def test_inference_encoder_is_the_encoder_while_training(tiny_gmsa):
    model = tiny_gmsa.model
    model.encoder.train()
    assert model.inference_encoder() is model.encoder
    model.encoder.eval()
    merged = model.inference_encoder()
    assert merged is not model.encoder and merged is model.inference_encoder()  # cached


def test_the_merged_copy_is_no_part_of_the_model(tiny_gmsa):
    model = tiny_gmsa.model.eval()
    names = set(model.state_dict())
    model.inference_encoder()
    assert set(model.state_dict()) == names
    assert not any("merged" in name for name, _ in model.named_modules())


def test_the_merged_copy_follows_a_cast(tiny_gmsa):
    model = tiny_gmsa.model.eval()
    first = model.inference_encoder()
    model.to(torch.bfloat16)
    second = model.inference_encoder()
    assert second is not first and next(second.parameters()).dtype == torch.bfloat16


def test_a_tensors_state_notices_every_change_of_its_tensors():
    layer = torch.nn.Linear(4, 3)
    tensors = lambda: [p.detach() for p in layer.parameters()]  # noqa: E731  (as lora_tensors gives them)
    state = TensorsState(tensors())
    assert state.holds(tensors())
    with torch.no_grad():
        layer.weight.add_(0.0)  # an in-place write, even of the same values, counts
    assert not state.holds(tensors())
    state = TensorsState(tensors())
    layer.load_state_dict(torch.nn.Linear(4, 3).state_dict())
    assert not state.holds(tensors())
    state = TensorsState(tensors())
    layer.to(torch.float64)
    assert not state.holds(tensors())
    with torch.inference_mode():  # inference tensors keep no version: their values are compared
        frozen = [torch.ones(3)]
        state = TensorsState(frozen)
        assert state.holds([torch.ones(3)]) and not state.holds([torch.zeros(3)])
