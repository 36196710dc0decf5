"""The forgetting table and the end-of-run headline numbers on a constructed history with known answers."""

import pytest

from stagewise.eval.forgetting import forgetting_report, metric_table
from stagewise.eval.headline import format_headlines, format_table, stage_headlines

COLUMNS = [{"key": "val_bpb/code", "stage": 0, "higher_is_better": False},
           {"key": "exact_match/chat", "stage": 1, "higher_is_better": True}]
HISTORY = [
    {"step": 1, "stage": 0, "loss": 5.0},
    {"step": 2, "stage": 0, "loss": 4.0, "val_bpb/code": 2.0},
    {"step": 3, "stage": 0, "val_bpb/code": 1.5},
    {"step": 4, "stage": 1, "val_bpb/code": 1.9, "exact_match": 0.25, "exact_match/chat": 0.25, "val_bpb/chat": 3.0},
    {"step": 5, "stage": 1, "val_bpb/code": 1.75, "exact_match": 0.5, "exact_match/chat": 0.5, "val_bpb/chat": 2.5},
    {"step": 6, "stage": 2, "val_bpb/code": 1.5, "exact_match/chat": 0.375, "val_reward": 0.4, "exact_match": 0.4,
     "reward/mean": 0.3},
]


def test_metric_table_values_and_direction_aware_forgetting():
    t = metric_table(HISTORY, 3, COLUMNS)
    assert t["values"] == [[1.5, None], [1.75, 0.5], [1.5, 0.375]]
    # bpb: value minus the lowest so far; exact_match: the highest so far minus the value
    assert t["forgetting"] == [[0.0, None], [pytest.approx(0.25), 0.0], [0.0, pytest.approx(0.125)]]
    assert forgetting_report(HISTORY, ["code", "chat", "grpo"], [], COLUMNS)["table"] == t
    assert "table" not in forgetting_report(HISTORY, ["code", "chat", "grpo"], [])


def test_headlines_are_each_stages_last_values():
    heads = stage_headlines(HISTORY, [("code", "lm"), ("chat", "sft"), ("grpo", "rl")])
    assert heads[0] == {"name": "code", "kind": "lm", "steps": (1, 3), "numbers": {"val_bpb/code": 1.5}}
    assert heads[1]["numbers"] == {"val_bpb/chat": 2.5, "exact_match": 0.5}
    assert heads[2]["numbers"] == {"val_reward": 0.4, "exact_match": 0.4, "reward/mean": 0.3}
    lines = format_headlines(heads)
    assert lines[2] == "  chat       sft  steps 4..5: bpb chat 2.500, exact-match 50.0%"
    table = format_table({"stages": ["code", "chat", "grpo"], "table": metric_table(HISTORY, 3, COLUMNS)})
    assert "50.0% (0.0%)" in table[3] and "37.5% (12.5%)" in table[4] and table[2].split()[-1] == "."
