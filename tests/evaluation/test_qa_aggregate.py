"""The QA summary: overall accuracy, accuracy on open (not yes/no) questions, bare yes/no outputs."""

import pytest

from gmsa.evaluation.qa import aggregate_qa, is_yes_no


def row(answers, output, contains):
    scores = {"contains": contains, "em": contains, "f1": contains}
    return {"answers": answers, "output": output, "scores": scores, "context_tokens": 4, "n_tokens": 16, "seconds": 0.1}


def test_yes_no_questions_are_told_apart_after_normalisation():
    assert is_yes_no(["Yes."]) and is_yes_no(["no", "No"])
    assert not is_yes_no(["yes", "Paris"]) and not is_yes_no(["Colombia"])


def test_a_model_that_says_yes_to_everything_scores_nothing_on_open_questions():
    rows = [
        row(["yes"], "Yes", 1.0),
        row(["Yes."], "yes", 1.0),
        row(["no"], "yes", 0.0),
        row(["Colombia"], "yes", 0.0),
        row(["Chili and Peru"], "Chili and Peru", 1.0),
    ]
    summary = aggregate_qa(rows)
    assert summary["contains"] == pytest.approx(60.0)
    assert summary["n_open"] == 2
    assert summary["contains_open"] == pytest.approx(50.0)  # 1 of the 2 open questions
    assert summary["contains_open_se"] == pytest.approx(50.0)  # sd 0.707 / sqrt(2)
    assert summary["yes_no_outputs"] == pytest.approx(80.0)  # 4 of 5 outputs are a bare yes


def test_no_open_questions_leaves_the_open_accuracy_out():
    summary = aggregate_qa([row(["yes"], "yes", 1.0)])
    assert summary["n_open"] == 0 and "contains_open" not in summary
