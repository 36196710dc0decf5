"""Forgetting across continual pre-training stages, computed from a metrics history.

Pure functions over metrics.jsonl records (dicts with "step", "stage" and, on evaluation
steps, "val_loss/<domain>"), so they can be checked on a constructed history and re-run
on any finished run.

- matrix L[i][j]: validation loss on domain j at the end of stage i (the last evaluation
  logged in stage i; a stage always evaluates on its final step); None where domain j had
  not been seen by stage i.
- forgetting F[i][j] = L[i][j] - min over k <= i of L[k][j]: how far domain j's loss is
  above the best it has been ("Gradient Episodic Memory", Lopez-Paz & Ranzato 2017, uses
  the same maximum-minus-current definition for accuracy).
- table (staged runs of any kinds, train/stages.py: forgetting_columns): the same, over every metric a
  stage introduced and every later stage measures: bits per byte of text domains and sft data (lower is
  better), exact_match of verifiable tasks (higher is better). values V[i][c] as for L; forgetting
  F[i][c] = how far V[i][c] is worse than the best value so far: V - min for lower-is-better columns,
  max - V for higher-is-better ones; never negative.
- stability gap (De Lange et al. 2023, "Continual evaluation for lifelong learning: identifying
  the stability gap"): at the start of stage i+1 a domain's loss often jumps and then
  partly recovers. For each boundary and each domain seen before it: the largest rise of
  the domain's loss over its boundary value among stage i+1's evaluations, the step of
  that peak, and the steps from the boundary until the loss is back at or below the
  boundary value after the peak (None if it never gets there during the stage).
"""

from __future__ import annotations

from typing import Optional, Sequence

PREFIX = "val_loss/"


def _evals(history: Sequence[dict], stage: int) -> list[dict]:
    return [r for r in history if r.get("stage") == stage and any(k.startswith(PREFIX) for k in r)]


def loss_matrix(history: Sequence[dict], n_stages: int, domains: Sequence[str]) -> list[list[Optional[float]]]:
    rows = []
    for i in range(n_stages):
        evals = _evals(history, i)
        last = evals[-1] if evals else {}
        rows.append([last.get(PREFIX + d) for d in domains])
    return rows


def forgetting(matrix: list[list[Optional[float]]]) -> list[list[Optional[float]]]:
    out = []
    for i, row in enumerate(matrix):
        out_row = []
        for j, value in enumerate(row):
            seen = [matrix[k][j] for k in range(i + 1) if matrix[k][j] is not None]
            out_row.append(None if value is None else value - min(seen))
        out.append(out_row)
    return out


def stability_gaps(history: Sequence[dict], n_stages: int, domains: Sequence[str]) -> list[dict]:
    gaps = []
    for i in range(n_stages - 1):
        before, after = _evals(history, i), _evals(history, i + 1)
        if not before or not after:
            continue
        boundary = before[-1]
        for d in domains:
            base = boundary.get(PREFIX + d)
            points = [(r["step"], r[PREFIX + d]) for r in after if PREFIX + d in r]
            if base is None or not points:
                continue
            peak_step, peak = max(points, key=lambda p: p[1] - base)  # first of equal peaks
            recovered = 0 if peak <= base else next(
                (s - boundary["step"] for s, v in points if s > peak_step and v <= base), None)
            gaps.append({"stage": i + 1, "domain": d, "boundary_step": boundary["step"], "boundary_loss": base,
                         "peak_rise": peak - base, "peak_step": peak_step, "recover_steps": recovered})
    return gaps


def metric_table(history: Sequence[dict], n_stages: int, columns: Sequence[dict]) -> dict:
    """{"columns", "values", "forgetting"} over `columns` ({"key", "stage", "higher_is_better"}): the last
    value of each key logged in stage i, None before the column's stage (or if never logged there)."""
    values = []
    for i in range(n_stages):
        evals = [r for r in history if r.get("stage") == i]
        row = []
        for c in columns:
            logged = [r[c["key"]] for r in evals if c["key"] in r] if c["stage"] <= i else []
            row.append(logged[-1] if logged else None)
        values.append(row)
    drops = []
    for i, row in enumerate(values):
        out = []
        for j, (c, v) in enumerate(zip(columns, row)):
            seen = [values[k][j] for k in range(i + 1) if values[k][j] is not None]
            if v is None:
                out.append(None)
            else:
                out.append(max(seen) - v if c["higher_is_better"] else v - min(seen))
        drops.append(out)
    return {"columns": [dict(c) for c in columns], "values": values, "forgetting": drops}


def forgetting_report(history: Sequence[dict], stages: Sequence[str], domains: Sequence[str],
                      columns: Sequence[dict] = ()) -> dict:
    """The content of RUN_DIR/forgetting.json for the (completed) `stages` of a run."""
    matrix = loss_matrix(history, len(stages), domains)
    out = {"domains": list(domains), "stages": list(stages), "matrix": matrix, "forgetting": forgetting(matrix),
           "stability_gap": stability_gaps(history, len(stages), domains)}
    if columns:
        out["table"] = metric_table(history, len(stages), columns)
    return out
