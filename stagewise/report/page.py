"""The report page: one self-contained HTML file beside its PNG figures.

The figures are separate files referenced by relative name (`loss.png`), not data URIs:
the page stays small and readable as source, each figure can be reused on its own, and
the folder works offline wherever it is copied. Styles are inline; nothing is fetched.
"""

from __future__ import annotations

import datetime
import html
import math
from pathlib import Path

from stagewise.errors import StagewiseError
from stagewise.report.rundata import BPB_PREFIX, MIX_PREFIX, VAL_PREFIX, RunData, load_run

FIGURES = ("loss.png", "lr.png", "val_domains.png", "mixture.png", "life_table.png", "life_curves.png",
           "forgetting.png")

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: #1d1d1f; background: #fafafa; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 16px; }
img { display: block; max-width: 100%; height: auto; background: white; border: 1px solid #e3e3e3; }
table { border-collapse: collapse; margin: 8px 0 12px; background: white; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th { background: #f0f0f0; }
td.l, th.l { text-align: left; }
table:not(.kv) td { white-space: nowrap; }
table.kv td:first-child { text-align: left; color: #555; white-space: nowrap; }
table.kv td + td { text-align: left; overflow-wrap: anywhere; }
.note { background: #fff8e1; border-left: 4px solid #f0c040; padding: 8px 12px; margin: 12px 0; }
.cap { color: #555; font-size: 13px; margin: 4px 0 0; }
.grid { display: grid; grid-template-columns: minmax(0, 5fr) minmax(0, 6fr); gap: 0 36px; align-items: start; }
.grid > div { overflow-x: auto; }
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _e(v)
    return format(v, fmt)


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Cells are already escaped/formatted strings; the first `left` columns are text (left-aligned)."""
    def cell(tag: str, k: int, c: str) -> str:
        return f"<{tag} class=\"l\">{c}</{tag}>" if k < left else f"<{tag}>{c}</{tag}>"
    head = "".join(cell("th", k, h) for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", k, c) for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(pairs: list[tuple[str, str]]) -> str:
    return "<table class=\"kv\">" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in pairs) + "</table>"


def _get(d: dict, path: str):
    for k in path.split("."):
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _summary(run: RunData) -> str:
    recs, cfg, info = run.records, run.config, run.run_info
    last = recs[-1]
    planned = _get(cfg, "train.steps")
    cfg_stages = [st for st in cfg.get("stages") or [] if isinstance(st, dict)]
    if cfg_stages:  # a staged recipe's budget is its stages' steps (unknown if any is open-ended)
        budgets = [st.get("steps") for st in cfg_stages]
        planned = sum(budgets) if all(isinstance(b, int) for b in budgets) else None
    steps = f"{last['step']:,}" + (f" of {planned:,}" if isinstance(planned, int) else "")
    pairs = [("config name", cfg.get("name", run.run_dir.name)), ("run directory", str(run.run_dir)),
             ("steps", steps)]
    if isinstance(last.get("tokens"), int):
        pairs.append(("tokens", f"{last['tokens']:,}"))
    _, loss = run.series("loss")
    if loss:
        k = min(len(loss), 20)
        pairs.append(("final train loss", f"{loss[-1]:.4f} (last {k} steps: mean {sum(loss[-k:]) / k:.4f})"))
    vs, vl = run.series("val_loss")
    if vs:
        pairs.append(("final validation loss", f"{vl[-1]:.4f} (step {vs[-1]:,})"))
    last_val = {d: run.series(VAL_PREFIX + d) for d in run.keys_with(VAL_PREFIX)}
    last_val = {d: (s[-1], v[-1]) for d, (s, v) in last_val.items() if s}
    if last_val:
        pairs.append(("final validation loss by domain", ", ".join(f"{d} {v:.4f}" for d, (_, v) in last_val.items())
                      + f" (step {max(s for s, _ in last_val.values()):,})"))
    bs, bv = run.series("val_bpb")
    if bs:
        pairs.append(("final validation bits per byte", f"{bv[-1]:.4f} (step {bs[-1]:,}; comparable across "
                      "tokenizers)"))
    last_bpb = {d: run.series(BPB_PREFIX + d)[1] for d in run.keys_with(BPB_PREFIX)}
    if any(last_bpb.values()):
        pairs.append(("final validation bits per byte by domain",
                      ", ".join(f"{d} {v[-1]:.4f}" for d, v in last_bpb.items() if v)))
    model = cfg.get("model") or {}
    if model.get("d_model") and model.get("n_layers"):
        pairs.append(("model", f"{model['n_layers']} layers x {model['d_model']} wide"))
    for label, key in (("precision", "precision.mode"), ("peak learning rate", "optim.lr"),
                       ("schedule", "schedule.name"), ("batch", "train.batch_size"), ("seq_len", "data.seq_len")):
        v = _get(cfg, key)
        if cfg_stages and key.split(".")[0] in ("optim", "schedule"):  # a stage may override these
            v = ", ".join(f"{st.get('name', i)} {_get(st, key) or v}" for i, st in enumerate(cfg_stages))
        if v is not None:
            pairs.append((label, str(v)))
    wall = sum(r["step_time_s"] for r in recs if isinstance(r.get("step_time_s"), (int, float)))
    if wall:
        pairs.append(("training time (steps only)", f"{wall / 60:.1f} min" if wall >= 120 else f"{wall:.1f} s"))
    skipped = sum(1 for r in recs if r.get("skipped"))
    if skipped:
        pairs.append(("skipped steps (non-finite gradient)", str(skipped)))
    for label, key in (("device", "device"), ("torch", "torch"), ("dataset", "dataset")):
        if info.get(key) is not None:
            pairs.append((label, str(info[key])))
    return "<h2>Run</h2>" + _kv(pairs)


def _stage_table(run: RunData) -> str:
    domains = run.keys_with(MIX_PREFIX)
    replay = [run.replay_key] if domains and run.replay_key else []
    rows = []
    for st in run.stages:
        in_stage = [r for r in run.records if st.first_step <= r["step"] <= st.last_step]
        tokens = [r["tokens"] for r in in_stage if isinstance(r.get("tokens"), int)]
        prev = [r["tokens"] for r in run.records if r["step"] < st.first_step and isinstance(r.get("tokens"), int)]
        n_tok = (tokens[-1] - (prev[-1] if prev else 0)) if tokens else None
        row = [_e(st.name), f"{st.first_step:,}–{st.last_step:,}", _num(n_tok, ",")]
        for key in [MIX_PREFIX + d for d in domains] + replay:
            vals = [r[key] for r in in_stage if isinstance(r.get(key), (int, float))]
            row.append(_num(sum(vals) / len(vals) if vals else None, ".3f"))
        rows.append(row)
    header = ["stage", "steps", "tokens"] + [_e(d) for d in domains] + (["replay"] if replay else [])
    cap = ""
    if domains:
        cap = ("<p class=\"cap\">Domain columns: mean realised fraction of the stage's sequences drawn from each "
               "domain (<code>mix/&lt;domain&gt;</code>)"
               + (f"; replay: mean <code>{replay[0]}</code>" if replay else "") + ".</p>")
    return "<h2>Stages</h2>" + _table(header, rows) + cap


def _forgetting_tables(run: RunData) -> str:
    f = run.forgetting
    out = ["<div class=\"grid\"><div><h3>Loss after each stage, L[i][j]</h3>",
           _table(["after stage"] + [_e(d) for d in f.domains],
                  [[_e(s)] + [_num(v) for v in row] for s, row in zip(f.stages, f.matrix)])]
    if f.forgetting is not None:
        out += ["</div><div><h3>Forgetting</h3>",
                _table(["after stage"] + [_e(d) for d in f.domains],
                       [[_e(s)] + [_num(v, "+.3f") for v in row] for s, row in zip(f.stages, f.forgetting)]),
                "<p class=\"cap\">F[i][j] = L[i][j] − min<sub>k≤i</sub> L[k][j], as written by the trainer in "
                "<code>forgetting.json</code>: how far domain j's loss is above the best it has been. "
                "— where undefined.</p>"]
    out.append("</div></div>")
    if f.stability_gap:
        cols = ["stage", "domain", "boundary_step", "boundary_loss", "peak_rise", "peak_step", "recover_steps"]
        labels = ["stage", "domain", "boundary step", "loss at boundary", "peak rise", "peak step",
                  "recovery (steps)"]
        fmts = {"boundary_loss": ".3f", "peak_rise": "+.3f", "boundary_step": ",", "peak_step": ","}
        rows = []
        for g in f.stability_gap:
            stage = g.get("stage")
            name = f.stages[stage] if isinstance(stage, int) and 0 <= stage < len(f.stages) else stage
            row = [_e(name), _e(g.get("domain", ""))]
            for c in cols[2:]:
                v = g.get(c, g.get("recovery_steps")) if c == "recover_steps" else g.get(c)
                row.append(_num(v, fmts.get(c, "")))
            rows.append(row)
        out += ["<h3>Stability gap</h3>", _table(labels, rows, left=2),
                "<p class=\"cap\">At each stage boundary: the domain's validation loss at the boundary, the "
                "largest rise above it afterwards (and when), and how many steps it took to return to the "
                "boundary loss (— where it did not, or the field is null).</p>"]
    return "".join(out)


MEMORY_ROWS = [("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer states"),
               ("activations", "activations kept for the backward"), ("loss_peak", "loss working set"),
               ("peak", "peak of tracked tensors")]


def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:,.2f} MiB"


def memory_rows(rec: dict) -> list[list[str]]:
    """component, predicted, measured, predicted / measured (what `stagewise report` prints and shows)."""
    p, m = rec["predicted"], rec.get("measured") or {}
    rows = []
    for key, label in MEMORY_ROWS:
        ratio = f"{p[key] / m[key]:.3f}" if m.get(key) else "–"
        rows.append([label, _mib(p.get(key)), _mib(m.get(key)), ratio])
    if "process" in p:
        got = m.get("process")
        rows.append(["process peak (CPU: VmHWM, with the interpreter; CUDA: max allocated)", _mib(p["process"]),
                     _mib(got), f"{p['process'] / got:.3f}" if got else "–"])
    return rows


def _memory_tables(run: RunData) -> str:
    parts = []
    for stage, rec in run.memory.items():
        s = rec.get("settings", {})
        what = ", ".join(f"{k} {v}" for k, v in s.items())
        at = f"measured on step {rec['measured']['at_step']}" if rec.get("measured") else "not measured"
        parts.append(f"<h3>{_e(stage)}</h3><p class=\"sub\">{_e(what)}; {at}</p>"
                     + _table(["component", "predicted", "measured", "ratio"],
                              [[_e(c) for c in r] for r in memory_rows(rec)]))
    return "".join(parts)


def _figure(name: str, alt: str, caption: str = "") -> str:
    cap = f"<p class=\"cap\">{caption}</p>" if caption else ""
    return f"<img src=\"{name}\" alt=\"{_e(alt)}\">{cap}"


def _import_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise StagewiseError("stagewise report needs matplotlib: pip install 'stagewise[experiments]'") from None
    from stagewise.report import plots

    return plots


def _life_section(run: RunData, out: Path, plots) -> list[str]:
    """forgetting.json's table across every stage kind: its heatmap and each column's curve over the run."""
    plots.plot_life_table(run, out / "life_table.png")
    plots.plot_life_curves(run, out / "life_curves.png")
    return ["<h2>What each stage forgot</h2>", _figure("life_table.png", "forgetting matrix across all stages",
             "Every domain and task (columns) measured after each stage (rows), from <code>forgetting.json</code>'s "
             "table: bits per byte of text domains and SFT data (lower is better), exact-match accuracy of "
             "verifiable tasks (higher is better). In brackets and in colour: how far the value is worse than the "
             "column's best so far."),
             _figure("life_curves.png", "each metric over the whole run",
                     "Each column of the matrix on every evaluation step; dashed lines mark stage boundaries.")]


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write out_dir (default RUN_DIR/report)/index.html and its figures; returns the HTML path."""
    run = load_run(run_dir)
    plots = _import_matplotlib()
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure a rerun no longer draws must not linger
        (out / name).unlink(missing_ok=True)

    stages, forgetting = run.stages, run.forgetting
    val_domains, mix_domains = run.keys_with(VAL_PREFIX), run.keys_with(MIX_PREFIX)
    colors = plots.domain_colors(list(dict.fromkeys((forgetting.domains if forgetting else []) + val_domains
                                                    + mix_domains)))
    name = run.config.get("name", run.run_dir.name)
    body = [f"<h1>{_e(name)}</h1>",
            f"<p class=\"sub\">stagewise run report · {len(stages) or 1} stage{'s' if len(stages) > 1 else ''} · "
            f"generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC</p>"]
    body += [f"<div class=\"note\">{_e(n)}</div>" for n in run.notes]
    body.append(f"<div class=\"grid\"><div>{_summary(run)}</div><div>{_stage_table(run)}</div></div>" if stages
                else _summary(run))

    plots.plot_loss(run, out / "loss.png")
    body += ["<h2>Training loss</h2>", _figure("loss.png", "training loss over steps",
             "Per-step training loss (thin), its moving average, and validation loss on evaluation steps."
             + (" Dashed lines mark stage boundaries." if len(stages) > 1 else ""))]
    plots.plot_lr(run, out / "lr.png")
    body += ["<h2>Learning rate</h2>", _figure("lr.png", "learning rate over steps")]

    if not stages:
        body.append("<div class=\"note\">Single-stage run: <code>metrics.jsonl</code> has no <code>stage</code> key, "
                    "so there are no stage boundaries, mixture proportions, forgetting matrix or stability gap "
                    "to show.</div>")
    if val_domains:
        plots.plot_val_domains(run, out / "val_domains.png", colors)
        body += ["<h2>Validation loss by domain</h2>", _figure("val_domains.png", "validation loss per domain",
                 "<code>val_loss/&lt;domain&gt;</code> on evaluation steps.")]
    elif stages:
        body.append("<div class=\"note\">No per-domain validation loss (<code>val_loss/&lt;domain&gt;</code>) "
                    "in metrics.jsonl.</div>")
    if mix_domains:
        w = plots.plot_mixture(run, out / "mixture.png", colors)
        body += ["<h2>Data mixture and replay</h2>", _figure("mixture.png", "mixture proportions over steps",
                 "Realised fraction of each step's sequences from each domain (<code>mix/&lt;domain&gt;</code>), "
                 "stacked" + (f", and <code>{run.replay_key}</code>" if run.replay_key else "")
                 + f"; moving average over {w} step{'s' if w > 1 else ''} within each stage.")]
    elif stages:
        body.append("<div class=\"note\">No mixture proportions (<code>mix/&lt;domain&gt;</code>) in "
                    "metrics.jsonl.</div>")
    if forgetting and forgetting.table:
        body += _life_section(run, out, plots)
    if forgetting:
        plots.plot_forgetting(run, out / "forgetting.png")
        body += ["<h2>Forgetting</h2>", _figure("forgetting.png", "forgetting heatmap",
                 "Validation loss on each domain (columns) after each stage (rows), from "
                 "<code>forgetting.json</code>."), _forgetting_tables(run)]
    elif stages:
        body.append("<div class=\"note\">No <code>forgetting.json</code> in the run directory (written when a "
                    "multi-stage run finishes): forgetting and stability gap not shown.</div>")

    if run.memory:
        body += ["<h2>Memory: predicted vs measured</h2>",
                 "<p>The plan's prediction of one step by component (<code>stagewise plan</code>) against the "
                 "measurement of the run's probe step (torch's MemTracker), from <code>memory.json</code>; "
                 "docs/memory.md.</p>", _memory_tables(run)]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(name)} · "
            f"stagewise report</title><style>{CSS}</style></head><body><main>\n" + "\n".join(body)
            + "\n</main></body></html>\n")
    index = out / "index.html"
    tmp = index.with_name("index.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index
