import pytest

from gmsa.training.data import subsample_sources


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
