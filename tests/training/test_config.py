"""One config tree: TrainConfig holds the GMSAConfig it trains; TOML tables, overrides and old flat configs."""

import dataclasses
import json
from pathlib import Path

import pytest

from gmsa.config import AE_PROMPT, GMSAConfig
from gmsa.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SHIPPED = REPO / "gmsa" / "pretrained" / "gmsa-smollm2-135m" / "gmsa_config.json"
ARCHITECTURE = ("k_enc", "k_lsa", "lsa_init", "merge", "lsa_match_embedding_scale", "lora_r", "lora_alpha")
ARCHITECTURE += ("ae_decoder_lora_r", "decoder_lora_r", "lsa_output_gain", "max_context_tokens", "default_rate")


def test_the_defaults_are_the_shipped_recipe():
    shipped = json.loads(SHIPPED.read_text())
    defaults = GMSAConfig()
    assert {key: getattr(defaults, key) for key in ARCHITECTURE} == {key: shipped[key] for key in ARCHITECTURE}
    ae = TrainConfig.from_sources([str(CONFIGS / "ae.toml")])
    assert ae.model == dataclasses.replace(defaults, ae_prompt="paper")  # the recipe's table states the defaults
    keft = TrainConfig.from_sources([str(CONFIGS / "keft.toml")])
    assert (keft.model.decoder_tuning, keft.model.decoder_lora_r) == (
        shipped["decoder_tuning"],
        shipped["decoder_lora_r"],
    )


def test_model_keys_come_from_the_table_from_short_overrides_and_from_dotted_ones(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("lr = 5e-4\nmax_steps = 10\n\n[model]\nk_enc = 2\nlora_r = 8\n")
    cfg = TrainConfig.from_sources([str(path)], ["max_steps=7", "--lr=1e-3", "k_enc=3", "model.lora_alpha=4"])
    assert (cfg.max_steps, cfg.lr) == (7, 1e-3)
    assert (cfg.model.k_enc, cfg.model.lora_r, cfg.model.lora_alpha) == (3, 8, 4)
    assert cfg.model.k_lsa == GMSAConfig().k_lsa  # untouched keys keep the defaults
    later = tmp_path / "later.toml"
    later.write_text("[model]\nlora_r = 16\n")
    merged = TrainConfig.from_sources([str(path), str(later)])
    assert (merged.model.k_enc, merged.model.lora_r) == (2, 16)  # tables merge key by key, files in order


def test_a_curriculum_caps_passage_lengths_from_its_steps(tmp_path):
    path = tmp_path / "ae.toml"
    path.write_text('lr = 5e-4\nrates = [4]\ncurriculum = { "0" = 64, "10" = 128 }\n')
    cfg = TrainConfig.from_sources([str(path)])
    assert (cfg.lr, cfg.rates) == (5e-4, [4])
    assert [cfg.max_tokens_at(s) for s in (0, 9, 10)] == [64, 64, 128]


def test_the_old_names_of_two_model_fields_still_read():
    cfg = TrainConfig.from_sources([], ["stage='keft'", "ae_decoder_lora=4", "keft_lora_r=2", "decoder_tuning='lora'"])
    assert (cfg.model.ae_decoder_lora_r, cfg.model.decoder_lora_r, cfg.model.decoder_tuning) == (4, 2, "lora")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learning_rate=1"], "unknown training options: \\['learning_rate'\\]"),
        (["model.k_encoder=1"], "unknown GMSA config keys: \\['k_encoder'\\]"),
        (["model=4"], "model must be a table"),
        (["k_enc"], "must look like key=value"),
        (["stage='keft'"], "stage keft tunes the decoder: set decoder_tuning"),
        (["stage='pretrain'"], "stage must be one of"),
    ],
)
def test_bad_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_sources([], overrides)


def test_a_config_round_trips_through_its_dict():
    cfg = TrainConfig.from_sources([str(CONFIGS / "ae.toml")], ["model.window_tokens=512"])
    assert TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def shipped_resume_config() -> dict:
    return json.loads((REPO / "checkpoints" / "ae" / "resume.json").read_text())["config"]


def test_the_shipped_resume_point_reads_as_the_recipe():
    cfg = TrainConfig.from_dict(shipped_resume_config())
    recipe = TrainConfig.from_sources([str(CONFIGS / "ae.toml")])
    assert cfg.model_config() == recipe.model_config()
    assert (cfg.stage, cfg.rates, cfg.curriculum, cfg.max_steps) == ("ae", recipe.rates, recipe.curriculum, 6000)


def test_a_flat_config_written_before_the_model_table_reads_as_the_recipe():
    """The session-7 resume point (tests/fixtures/resume-config-flat.json) was written before the
    [model] table: model keys beside the others, under their old names."""
    flat = json.loads((REPO / "tests" / "fixtures" / "resume-config-flat.json").read_text())
    assert "k_enc" in flat and "model" not in flat
    cfg = TrainConfig.from_dict(flat)
    recipe = TrainConfig.from_sources([str(CONFIGS / "ae.toml")])
    assert cfg.model_config() == recipe.model_config()  # its decoder_tuning "qkv" was the old default, unused in ae
    assert (cfg.stage, cfg.curriculum, cfg.lsa_lr, cfg.max_steps) == ("ae", recipe.curriculum, 3e-4, 6000)
    built = cfg.model_config()
    assert built.decoder_tuning == "none" and built.ae_decoder_lora_r == 16 and built.k_enc == 4
    assert GMSAConfig(**(dataclasses.asdict(built) | {"ae_prompt": AE_PROMPT})).max_context_tokens == 2048


def test_only_the_keft_stage_builds_a_tuned_decoder():
    values = {"model": {"decoder_tuning": "lora", "max_context_tokens": 64}, "max_tokens": 128}
    assert TrainConfig.from_dict(values).model_config().decoder_tuning == "none"
    keft = TrainConfig.from_dict(values | {"stage": "keft"}).model_config()
    assert keft.decoder_tuning == "lora" and keft.max_context_tokens == 128  # the window covers max_tokens


def test_data_may_list_several_files_and_a_single_path_still_reads():
    keft = TrainConfig.from_sources([str(CONFIGS / "keft.toml")])
    assert keft.data == "data/qa/train.jsonl"
    both = TrainConfig.from_sources(
        [str(CONFIGS / "keft.toml")], ['data=["data/qa/train.jsonl", "data/qa/cloze-train.jsonl"]']
    )
    assert both.data == ["data/qa/train.jsonl", "data/qa/cloze-train.jsonl"]
