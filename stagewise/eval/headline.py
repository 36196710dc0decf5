"""The end-of-run summary of a staged run: each stage's headline numbers and the forgetting table.

Pure functions over metrics.jsonl records and forgetting.json, so the printout of any finished run
can be re-made (`stagewise summary RUN_DIR`) and checked on a constructed history. Every number is
the stage's last logged value (a stage always evaluates on its final step):

  lm    val_bpb/<domain>: validation bits per byte of every domain seen so far
  sft   val_bpb/<stage>: bits per byte of its validation conversations' assistant tokens;
        exact_match: share of its validation problems answered exactly (greedy)
  dpo   val_rewards/accuracies: share of validation pairs whose implicit reward ranks chosen above
        rejected; exact_match as for sft
  rl    val_reward: mean verifier reward of greedy answers to its validation problems; exact_match;
        reward/mean: mean reward of the last rollout's sampled completions
"""

from __future__ import annotations

from typing import Sequence

HEADLINES = {
    "lm": [],  # filled per stage: val_bpb/<domain>
    "sft": ["exact_match"],
    "dpo": ["val_rewards/accuracies", "exact_match"],
    "rl": ["val_reward", "exact_match", "reward/mean"],
}
LABELS = {"val_rewards/accuracies": "reward accuracy", "exact_match": "exact-match", "val_reward": "val reward",
          "reward/mean": "sampled reward"}


def stage_headlines(history: Sequence[dict], stages: Sequence[tuple[str, str]]) -> list[dict]:
    """Per stage (name, kind): {"name", "kind", "steps": (first, last), "numbers": {key: last value}}."""
    out = []
    for i, (name, kind) in enumerate(stages):
        rows = [r for r in history if r.get("stage") == i]
        if not rows:
            continue
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("val_bpb/")] \
            if kind == "lm" else ([f"val_bpb/{name}"] if kind == "sft" else []) + HEADLINES.get(kind, [])
        numbers = {}
        for k in keys:
            logged = [r[k] for r in rows if k in r]
            if logged:
                numbers[k] = logged[-1]
        out.append({"name": name, "kind": kind, "steps": (rows[0]["step"], rows[-1]["step"]), "numbers": numbers})
    return out


def _label(key: str) -> str:
    if key.startswith("val_bpb/"):
        return f"bpb {key.split('/', 1)[1]}"
    return LABELS.get(key, key)


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if key.startswith(("exact_match", "val_rewards/accuracies")) else f"{v:.3f}"


def format_headlines(heads: list[dict]) -> list[str]:
    lines = ["headline numbers (last evaluation of each stage):"]
    for h in heads:
        nums = ", ".join(f"{_label(k)} {_fmt(k, v)}" for k, v in h["numbers"].items())
        lines.append(f"  {h['name']:<10} {h['kind']:<4} steps {h['steps'][0]}..{h['steps'][1]}: {nums}")
    return lines


def format_table(forgetting: dict) -> list[str]:
    """forgetting.json's table as text: value (forgetting) per stage and column; '.' before a column exists."""
    table = forgetting.get("table")
    if not table:
        return []
    keys = [c["key"] for c in table["columns"]]
    width = max(12, *(len(k) + 1 for k in keys))
    lines = ["forgetting matrix: the value after each stage (how much worse than its best so far; bits per byte: "
             "lower is better, exact_match: higher is better)",
             "  " + f"{'after':<10}" + "".join(f"{k:>{width + 9}}" for k in keys)]
    for stage, vals, drops in zip(forgetting["stages"], table["values"], table["forgetting"]):
        cells = []
        for k, v, d in zip(keys, vals, drops):
            cells.append(f"{'.':>{width + 9}}" if v is None else f"{_fmt(k, v) + ' (' + _fmt(k, d) + ')':>{width + 9}}")
        lines.append("  " + f"{stage:<10}" + "".join(cells))
    return lines
