import json
import os

import pytest

from gmsa.training import transport
from gmsa.training.transport import TransportError


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 3500])
def test_split_and_join_round_trip_at_part_boundaries(tmp_path, size):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(size))
    manifest = transport.split(source, tmp_path / "parts", "blob", part_bytes=1000)
    assert len(manifest["parts"]) == max(1, -(-size // 1000))
    assert all(p["bytes"] <= 1000 for p in manifest["parts"]) and manifest["bytes"] == size
    joined = transport.join(tmp_path / "parts" / "blob.json", tmp_path / "joined")
    assert joined.read_bytes() == source.read_bytes()


def test_a_corrupt_or_missing_part_is_named(tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(2500))
    transport.split(source, tmp_path / "parts", "blob", part_bytes=1000)
    part = tmp_path / "parts" / "blob.part-01"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(TransportError, match="blob.part-01 does not match its sha256"):
        transport.join(tmp_path / "parts" / "blob.json", tmp_path / "joined")
    part.unlink()
    manifest = transport.read_manifest(tmp_path / "parts" / "blob.json")
    assert transport.missing_parts(manifest, tmp_path / "parts") == ["blob.part-01"]
    assert transport.main(["verify", str(tmp_path / "parts" / "blob.json")]) == 2


def test_pack_and_unpack_a_directory(tmp_path):
    src = tmp_path / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "model" / "model.safetensors").write_bytes(os.urandom(5000))
    (src / "results.json").write_text(json.dumps({"ok": True}))
    assert transport.main(["pack", str(src), str(tmp_path / "out"), "--name", "result", "--part-mib", "0.002"]) == 0
    parts = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "result.json" in parts and len(parts) > 3
    assert transport.main(["unpack", str(tmp_path / "out" / "result.json"), str(tmp_path / "back")]) == 0
    back = tmp_path / "back"
    assert (back / "model" / "model.safetensors").read_bytes() == (src / "model" / "model.safetensors").read_bytes()
    assert json.loads((back / "results.json").read_text()) == {"ok": True}


def test_an_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(TransportError, match="not a readable parts manifest"):
        transport.read_manifest(tmp_path / "m.json")
