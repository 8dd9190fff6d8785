import json

import pytest

from gmsa.training.curves import latest_rows, main, smooth


def write_metrics(path, losses, val_every=2):
    rows = []
    for step, loss in enumerate(losses, 1):
        rows.append({"step": step, "loss": loss})
        if step % val_every == 0:
            rows.append({"step": step, "val_loss_x4": loss, "val_bleu_x4": 0.1 * step})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_latest_rows_keep_the_last_row_of_a_step_logged_twice():
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "val_loss_x4": 1}]
    train, val = latest_rows(rows)
    assert [r["loss"] for r in train] == [3.0, 1.5]
    assert val == [{"step": 2, "val_loss_x4": 1}]


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], window=2) == pytest.approx([1.0, 2.0, 4.0, 6.0])


def test_single_run_and_comparison_plots_are_written(tmp_path):
    a = write_metrics(tmp_path / "a.jsonl", [4.0, 3.5, 3.2, 3.0])
    b = write_metrics(tmp_path / "b.jsonl", [4.0, 3.9, 3.8, 3.7])
    assert main([str(a), str(tmp_path / "one.png")]) == 0
    assert main(["--compare", f"gmsa={a}", f"linear={b}", "--val-key=val_loss_x4", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "one.png").stat().st_size > 1000
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rate_that_joins_the_validation_later_is_plotted_from_then_on(tmp_path):
    path = write_metrics(tmp_path / "m.jsonl", [4.0, 3.5, 3.2, 3.0])
    later = {"step": 4, "val_loss_x4": 3.0, "val_bleu_x4": 0.4, "val_loss_x8": 3.6, "val_bleu_x8": 0.1}
    path.write_text(path.read_text() + json.dumps(later) + "\n")
    assert main([str(path), str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv", [[], ["only-one.jsonl"], ["--compare", "out.png"]])
def test_wrong_arguments_print_the_usage(argv, capsys):
    assert main(argv) == 2
    assert "python -m gmsa.training.curves" in capsys.readouterr().err
