"""``gmsa demo``'s timing and status line (the full demo runs in test_slow.py)."""

import json

from gmsa.evaluation.demo import DEMO_FILE, checkpoint_status, median_times


def test_each_function_warms_up_then_they_take_turns():
    calls = []
    seconds = median_times([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3)
    assert calls == ["a", "b"] * 4 and len(seconds) == 2 and all(s >= 0 for s in seconds)


def test_the_status_line_is_only_claimed_for_the_checkpoint_it_describes():
    demo = json.loads(DEMO_FILE.read_text())
    shipped = demo["shipped_status"]["checkpoint_id"]
    assert checkpoint_status(demo, None, shipped).startswith(f"shipped checkpoint {shipped}: trained")
    other = checkpoint_status(demo, "runs/ae", "0123456789abcdef")
    assert "runs/ae" in other and "not the one this demo describes" in other
