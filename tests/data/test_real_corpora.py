"""The full corpus build on the real packages, run only where they are already cached.

``make test`` downloads nothing: on a fresh machine this is skipped (``gmsa data prepare``
fetches the ~400 MB of packages, bigbench alone 358 MB); the other corpus tests use the small
fixture archives of ``conftest.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmsa.data.fetch import PACKAGES, cache_dir
from gmsa.data.prepare import DEFAULT_SOURCES, prepare

CACHED = {key: cache_dir() / "downloads" / pkg.filename for key, pkg in PACKAGES.items()}
MISSING = sorted(key for key, path in CACHED.items() if not path.is_file())

pytestmark = [
    pytest.mark.corpora,
    pytest.mark.skipif(bool(MISSING), reason=f"corpus packages not cached: {', '.join(MISSING)} (gmsa data prepare)"),
]


def words(text: str) -> int:
    return len(text.split())


def test_every_source_builds_from_the_cached_packages(tmp_path: Path) -> None:
    stats = prepare(tmp_path, DEFAULT_SOURCES, count_tokens=words, paths=CACHED, max_mb=0.5, progress=False)
    for kind in ("ae", "qa"):
        for split in ("train", "val", "test"):
            assert stats[kind][split]["_all"]["rows"] > 0, (kind, split)
    test_sources = {json.loads(line)["source"] for line in (tmp_path / "qa" / "test.jsonl").open()}
    assert set(stats["eval_only"]) <= test_sources
