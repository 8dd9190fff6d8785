"""The compared methods (prompt layout, budgets) and the harness's selection, cache and model specs."""

from __future__ import annotations

import pytest
import torch

from gmsa.evaluation.baselines import (
    ClosedBook,
    Generation,
    GMSAMethod,
    TruncateHead,
    TruncateTail,
    Uncompressed,
    UncompressedRestatement,
    budget,
)
from gmsa.evaluation.common import (
    Example,
    ModelSpec,
    ResultCache,
    length_bucket,
    load_examples,
    select_examples,
)
from gmsa.evaluation.qa import base_decoder_model, build_qa_methods

CONTEXT = "Paris is the capital of France and its largest city."
QUESTION = "What is the capital of France?"
GENERATION = Generation(max_new_tokens=6, repetition_penalty=1.3)


def _ids(gmsa, text: str) -> list[int]:
    return gmsa.tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    "method_class,pick",
    [
        (Uncompressed, lambda ids: ids),
        (ClosedBook, lambda ids: []),
        (TruncateHead, lambda ids: ids[: budget(len(ids), 4)]),
        (TruncateTail, lambda ids: ids[-budget(len(ids), 4) :]),
    ],
)
def test_text_baselines_read_context_tokens_then_question(tiny_gmsa, method_class, pick):
    """The decoder's first layer sees exactly embed(context part + question): no template, no separator."""
    decoder = tiny_gmsa.model.decoder
    seen = []

    def record_first_input(module, args, kwargs):
        if not seen:
            seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    hook = decoder.model.layers[0].register_forward_pre_hook(record_first_input, with_kwargs=True)
    try:
        [output] = method_class("m", tiny_gmsa, GENERATION).run([CONTEXT], [QUESTION], rate=4)
    finally:
        hook.remove()
    context_ids = pick(_ids(tiny_gmsa, CONTEXT))
    prompt = torch.tensor(context_ids + _ids(tiny_gmsa, QUESTION))
    assert output.context_tokens == len(context_ids)
    torch.testing.assert_close(seen[0][0], decoder.get_input_embeddings()(prompt))


def test_batched_answers_equal_single_ones(tiny_gmsa):
    method = TruncateHead("head", tiny_gmsa, GENERATION)
    contexts = [CONTEXT, "The quick brown fox jumps over the lazy dog."]
    questions = [QUESTION, "Who jumps?"]
    together = method.answer(contexts, questions, rate=2)
    assert together == [method.answer([c], [q], rate=2)[0] for c, q in zip(contexts, questions)]


def test_gmsa_method_reads_ceil_l_over_rate_soft_tokens(tiny_gmsa):
    [output] = GMSAMethod("gmsa", tiny_gmsa, GENERATION).run([CONTEXT], [QUESTION], rate=4)
    assert output.context_tokens == budget(len(_ids(tiny_gmsa, CONTEXT)), 4)


def test_ceiling_restates_the_uncompressed_text_with_the_same_decoding(tiny_gmsa):
    outputs = UncompressedRestatement("ceiling", tiny_gmsa).reconstruct([CONTEXT], None)
    expected = tiny_gmsa.reconstruct(tiny_gmsa.uncompressed([CONTEXT]))
    assert [o.text for o in outputs] == expected
    assert outputs[0].context_tokens == len(_ids(tiny_gmsa, CONTEXT))


@pytest.mark.parametrize("n,rate,expected", [(0, 4, 0), (1, 4, 1), (8, 4, 2), (9, 4, 3), (512, 16, 32)])
def test_budget(n, rate, expected):
    assert budget(n, rate) == expected


def test_cache_id_tracks_settings(tiny_gmsa):
    a = Uncompressed("u", tiny_gmsa, Generation(100, 1.3))
    assert a.cache_id == Uncompressed("other name", tiny_gmsa, Generation(100, 1.3)).cache_id
    assert a.cache_id != Uncompressed("u", tiny_gmsa, Generation(50, 1.3)).cache_id
    assert a.cache_id != ClosedBook("u", tiny_gmsa, Generation(100, 1.3)).cache_id


def test_baselines_on_the_same_untuned_decoder_share_their_cache(backbone_dir, make_gmsa):
    one, other = make_gmsa(backbone_dir, k_enc=1), make_gmsa(backbone_dir, k_enc=2)
    assert Uncompressed("u", one).cache_id == Uncompressed("u", other).cache_id  # same backbone decoder
    assert GMSAMethod("g", one).cache_id != GMSAMethod("g", other).cache_id
    assert Uncompressed("u", make_gmsa(backbone_dir, decoder_tuning="qkv")).cache_id != Uncompressed("u", one).cache_id


def test_generation_settings_are_checked():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Generation(0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        Generation(10, 0.0)


def test_keft_models_get_their_own_uncompressed_row(backbone_dir, make_gmsa):
    plain, tuned = make_gmsa(backbone_dir), make_gmsa(backbone_dir, decoder_tuning="qkv")
    models = [("keft", tuned), ("ae", plain)]
    base = base_decoder_model(models, None)
    assert base is plain  # an AE-only model's decoder is the untouched backbone
    methods = build_qa_methods(models, ["uncompressed", "closed-book"], GENERATION, base)
    assert [(m.name, label) for m, label in methods] == [
        ("gmsa[keft]", "keft"),
        ("uncompressed[keft decoder]", "keft"),
        ("gmsa[ae]", "ae"),
        ("uncompressed", ""),
        ("closed-book", ""),
    ]
    assert methods[1][0].gmsa is tuned and methods[3][0].gmsa is plain
    assert base_decoder_model([("keft", tuned)], str(backbone_dir)).config.decoder_tuning == "none"
    with pytest.raises(ValueError, match="unknown baselines"):
        build_qa_methods(models, ["magic"], GENERATION, base)


# ----------------------------------------------------------------------------- selection, cache, specs
def _examples(n: int) -> list[Example]:
    return [Example(f"e{i}", f"text {i}", source="ab"[i % 2], n_tokens=100 * i) for i in range(n)]


def test_select_examples_is_seeded_and_balanced():
    examples = _examples(20)
    first = select_examples(examples, 6, seed=0, group=lambda e: e.source)
    assert first == select_examples(examples, 6, seed=0, group=lambda e: e.source)
    assert first != select_examples(examples, 6, seed=1, group=lambda e: e.source)
    assert sorted(e.source for e in first) == ["a", "a", "a", "b", "b", "b"]
    assert len(select_examples(examples, None, seed=0, group=lambda e: e.source)) == 20
    with pytest.raises(ValueError, match="limit must be >= 1"):
        select_examples(examples, 0, seed=0, group=lambda e: e.source)


@pytest.mark.parametrize(
    "n,bucket",
    [
        (1, "<=128"),
        (128, "<=128"),
        (129, "129-256"),
        (256, "129-256"),
        (257, "257-512"),
        (512, "257-512"),
        (513, ">512"),
    ],
)
def test_length_bucket(n, bucket):
    assert length_bucket(n) == bucket


def test_result_cache_persists_and_keys_on_rate_and_text(tmp_path):
    cache = ResultCache(tmp_path, "qa", "gmsa[x]", "abc")
    example = Example("e", "context", "question?")
    key = cache.key(4, example)
    assert key != cache.key(8, example) and key != cache.key(4, Example("e", "context", "other?"))
    cache.put_many([{"key": key, "text": "out", "context_tokens": 2, "extra": {}, "seconds": 0.1}])
    reopened = ResultCache(tmp_path, "qa", "gmsa[x]", "abc")
    assert key in reopened and reopened.get(key)["text"] == "out"
    assert key not in ResultCache(tmp_path, "qa", "gmsa[x]", "other-settings")


@pytest.mark.parametrize(
    "text,label,source,overrides",
    [
        ("default", "default", "default", {}),
        ("runs/ae-1/model", "ae-1", "runs/ae-1/model", {}),
        ("ckpt/gmsa-x", "gmsa-x", "ckpt/gmsa-x", {}),
        ("mine=runs/a/model", "mine", "runs/a/model", {}),
        ("untrained", "untrained", "untrained", {}),
        (
            "untrained:k_enc=2,merge=memory",
            "untrained(k_enc=2,merge=memory)",
            "untrained",
            {"k_enc": 2, "merge": "memory"},
        ),
        ("mem=untrained:merge=memory", "mem", "untrained", {"merge": "memory"}),
    ],
)
def test_model_spec_parse(text, label, source, overrides):
    spec = ModelSpec.parse(text)
    assert (spec.label, spec.source, spec.overrides) == (label, source, overrides)


def test_load_examples_recounts_tokens_and_skips_unusable_rows(tiny_gmsa, tmp_path):
    path = tmp_path / "ae.jsonl"
    path.write_text('{"text": "Paris is the capital of France."}\n\n{"text": "  "}\n{"text": "The quick brown fox."}\n')
    examples, skipped = load_examples(path, "reconstruct", tiny_gmsa.tokenizer)
    assert [e.n_tokens for e in examples] == [len(_ids(tiny_gmsa, e.context)) for e in examples]
    assert [e.id for e in examples] == ["ae:1", "ae:3"]  # rows (blank lines skipped)
    assert skipped == [f"{path}, row 2: empty context"]

    path.write_text(
        '{"context": "x", "question": "", "answers": ["y"]}\n{"context": "x", "question": "q", "answers": [" "]}\n'
    )
    with pytest.raises(ValueError, match=r"has no usable examples \(.*row 1: no question or no non-empty answer"):
        load_examples(path, "qa", tiny_gmsa.tokenizer)


@pytest.mark.parametrize(
    "line,message",
    [
        ('["a list"]', "row 1: expected a JSON object"),
        ('{"context": "x", "question": "q"}', "row 1: missing field 'answers'"),
        ('{"context": "x", "question": "q", "answers": "z"}', "row 1: field 'answers' must be a list"),
        ('{"context": 3, "question": "q", "answers": ["z"]}', "row 1: field 'context' must be a str"),
    ],
)
def test_load_examples_refuses_malformed_rows(tiny_gmsa, tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_examples(path, "qa", tiny_gmsa.tokenizer)
