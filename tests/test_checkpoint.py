"""Trained weights on disk: hashing, the atomic write, verification, loading into a model."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from gmsa.checkpoint import (
    DEFAULT_CHECKPOINT,
    ID_CHARS,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_backbone,
    file_sha256,
    load_trained,
    read_checkpoint,
    write_checkpoint,
)
from gmsa.config import CONFIG_NAME, GMSAConfig
from gmsa.model import trained_state_dict


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"lsa.weight": torch.randn(3, 4), "encoder.lora_A": torch.randn(2, 4)}


@pytest.fixture
def written(tmp_path):
    directory = tmp_path / "ckpt"
    write_checkpoint(directory, GMSAConfig(k_enc=2, backbone_fingerprint="fp"), weights(), dtype=None)
    return directory


def test_file_sha256_hashes_every_block(tmp_path):
    data = bytes(range(256)) * 5000  # over one 1 MiB block
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_round_trip_keeps_config_and_tensors(written):
    found = read_checkpoint(written)
    assert found.config == GMSAConfig(k_enc=2, backbone_fingerprint="fp")
    assert found.weights.keys() == weights().keys()
    for name, tensor in weights().items():
        assert torch.equal(found.weights[name], tensor)
    assert found.checkpoint_id == file_sha256(written / WEIGHTS_NAME)[:ID_CHARS]
    assert found.directory == written


def test_write_casts_to_bf16_by_default(tmp_path):
    write_checkpoint(tmp_path / "ckpt", GMSAConfig(), weights())
    assert {t.dtype for t in read_checkpoint(tmp_path / "ckpt").weights.values()} == {torch.bfloat16}


def test_written_files_and_manifest(written):
    assert sorted(p.name for p in written.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME])
    manifest = json.loads((written / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == {WEIGHTS_NAME: file_sha256(written / WEIGHTS_NAME)}
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in written.iterdir())


def test_rewrite_replaces_atomically(written):
    write_checkpoint(written, GMSAConfig(k_enc=3), weights(), dtype=None)
    assert sorted(p.name for p in written.parent.iterdir()) == ["ckpt"]  # no staging directory left behind
    assert read_checkpoint(written).config.k_enc == 3


def test_corrupt_weights_are_a_clear_error(written):
    data = bytearray((written / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0xFF
    (written / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum: the file is corrupt"):
        read_checkpoint(written)


@pytest.mark.parametrize("manifest", [None, "not json", json.dumps({"sha256": {}}), json.dumps([1])])
def test_missing_or_broken_manifest_is_a_clear_error(written, manifest):
    path = written / MANIFEST_NAME
    if manifest is None:
        path.unlink()
    else:
        path.write_text(manifest)
    with pytest.raises(CheckpointError, match="manifest.json is missing or corrupt"):
        read_checkpoint(written)


def test_unreadable_weights_with_a_matching_checksum_are_a_clear_error(written):
    (written / WEIGHTS_NAME).write_bytes(b"not safetensors")
    manifest = {"sha256": {WEIGHTS_NAME: file_sha256(written / WEIGHTS_NAME)}}
    (written / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(written)


def test_a_directory_without_weights_is_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no GMSA checkpoint"):
        read_checkpoint(tmp_path)


def test_the_shipped_checkpoint_verifies():
    found = read_checkpoint()
    assert found.directory == DEFAULT_CHECKPOINT
    assert found.checkpoint_id == file_sha256(DEFAULT_CHECKPOINT / WEIGHTS_NAME)[:ID_CHARS]
    assert found.config.backbone_fingerprint and found.weights


def test_check_backbone_names_both_fingerprints():
    config = GMSAConfig(backbone_fingerprint="aaaa")
    check_backbone(config, "aaaa", "ckpt")
    check_backbone(GMSAConfig(), "anything", "ckpt")  # an untrained config names no backbone
    with pytest.raises(CheckpointError, match="ckpt was trained on .* fingerprint aaaa, .* fingerprint bbbb"):
        check_backbone(config, "bbbb", "ckpt")


# ----------------------------------------------------------------- into a model
def test_load_trained_copies_every_tensor(tiny_gmsa, make_gmsa, backbone_dir):
    source = {name: torch.randn_like(tensor) for name, tensor in trained_state_dict(tiny_gmsa.model).items()}
    target = make_gmsa(backbone_dir)
    load_trained(target.model, source)
    for name, tensor in trained_state_dict(target.model).items():
        assert torch.equal(tensor, source[name])


def test_load_trained_lays_tensors_out_with_place(tiny_gmsa):
    source = trained_state_dict(tiny_gmsa.model)
    placed = []
    load_trained(tiny_gmsa.model, source, place=lambda full, reference: placed.append(full) or full)
    assert len(placed) == len(source)


def test_load_trained_refuses_other_keys_and_shapes(tiny_gmsa):
    source = dict(trained_state_dict(tiny_gmsa.model))
    name = next(iter(source))
    with pytest.raises(CheckpointError, match="does not fit this model config: missing"):
        load_trained(tiny_gmsa.model, {k: v for k, v in source.items() if k != name}, "ckpt")
    with pytest.raises(CheckpointError, match=f"ckpt: {name} has shape"):
        load_trained(tiny_gmsa.model, source | {name: torch.zeros(1)}, "ckpt")
