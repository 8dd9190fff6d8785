import json

import pytest

from gmsa.training.data import read_rows, subsample_sources


def rows(n_per_source: int) -> list[dict]:
    return [{"source": s, "id": i} for i in range(n_per_source) for s in ("boolq", "quac")]


def test_subsample_keeps_about_the_fraction_of_a_listed_source_and_all_others():
    kept = subsample_sources(rows(2000), {"boolq": 0.25}, seed=0)
    boolq = [r for r in kept if r["source"] == "boolq"]
    assert 400 < len(boolq) < 600
    assert sum(r["source"] == "quac" for r in kept) == 2000


def test_subsample_is_seeded_and_keeps_order():
    a = subsample_sources(rows(100), {"boolq": 0.5}, seed=1)
    assert a == subsample_sources(rows(100), {"boolq": 0.5}, seed=1)
    assert a == sorted(a, key=lambda r: (r["id"], r["source"]))


def test_subsample_without_fractions_is_identity():
    assert subsample_sources(rows(5), {}) == rows(5)


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_subsample_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match="boolq"):
        subsample_sources(rows(1), {"boolq": fraction})


def write_rows(path, sources):
    path.write_text("".join(json.dumps({"source": source, "question": "q?"}) + "\n" for source in sources))
    return str(path)


def test_read_rows_reads_one_file_or_several_in_order(tmp_path):
    qa = write_rows(tmp_path / "qa.jsonl", ["boolq", "quac"])
    cloze = write_rows(tmp_path / "cloze.jsonl", ["cloze"])
    assert [row["source"] for row in read_rows(qa)] == ["boolq", "quac"]
    assert [row["source"] for row in read_rows([qa, cloze])] == ["boolq", "quac", "cloze"]


def test_read_rows_names_a_missing_file_and_refuses_an_empty_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_rows([write_rows(tmp_path / "qa.jsonl", ["boolq"]), str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="no file"):
        read_rows([])
    with pytest.raises(FileNotFoundError, match="gmsa data cloze --from data/ae/train.jsonl"):
        read_rows([str(tmp_path / "cloze-train.jsonl")])  # the command that makes it, not only `data prepare`
