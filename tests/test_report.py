"""`stagewise report`: the page and figures are written, self-contained, and show the run's numbers."""

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, system_dep
from stagewise.cli import main

DOMAINS = ["web", "code", "math"]
STAGES = ["base", "code-cpt", "math-cpt"]
# Distinct values with three decimals: each must appear verbatim in the L[i][j] table.
MATRIX = [[3.125, 4.875, 5.5], [3.375, 2.25, 5.125], [3.625, 2.5, 2.75]]
FORGETTING = [[0.0, None, None], [0.25, 0.0, None], [0.5, 0.25, 0.0]]
GAP = [{"stage": 1, "domain": "web", "boundary_step": 30, "boundary_loss": 3.125, "peak_rise": 0.375,
        "peak_step": 34, "recovery_steps": 12},
       {"stage": 2, "domain": "code", "boundary_step": 60, "boundary_loss": 2.25, "peak_rise": 0.625,
        "peak_step": 63, "recovery_steps": None}]


def _write_run(d: Path, records: list[dict], config: str = "name: synth\ntrain: {steps: 90}\n") -> Path:
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config)
    (d / "run_info.json").write_text(json.dumps({"device": "cpu", "torch": "2.13.0+cpu"}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def single_stage_run(d: Path) -> Path:
    recs = [{"step": s, "tokens": 512 * s, "loss": 6.0 - s / 20, "lr": 1e-3 * min(1, s / 5)} for s in range(1, 61)]
    for r in recs[9::10]:
        r["val_loss"] = r["loss"] + 0.1
        r["val_bpb"] = r["step"] / 1000 + 1.0
    return _write_run(d, recs, "name: single\ntrain: {steps: 60}\n")


def three_stage_run(d: Path, trainer_keys: bool = False) -> Path:
    """trainer_keys: `replay`, `recover_steps` and no `stage_name` (names from config.yaml's stages), as
    the trainer writes them; otherwise the alternatives the report also accepts (`replay_frac`,
    `recovery_steps`, a per-line `stage_name`)."""
    recs = []
    for s in range(1, 91):
        i = (s - 1) // 30
        mix = {"web": 1.0, "code": 0.0, "math": 0.0} if i == 0 else \
              {"web": 0.2, "code": 0.8, "math": 0.0} if i == 1 else {"web": 0.1, "code": 0.1, "math": 0.8}
        r = {"step": s, "tokens": 1024 * s, "loss": 4.0 - 0.01 * s, "lr": 1e-3, "stage": i, "stage_name": STAGES[i],
             "replay_frac": 0.0 if i == 0 else 0.2, **{f"mix/{k}": v for k, v in mix.items()}}
        if s % 10 == 0:
            r.update({f"val_loss/{k}": 3.0 + j + 0.001 * s for j, k in enumerate(DOMAINS)})
        if trainer_keys:  # no replay key before anything can be replayed
            replay = r.pop("replay_frac")
            if i:
                r["replay"] = replay
            del r["stage_name"]
        recs.append(r)
    config = "name: synth\ntrain: {steps: 90}\n"
    if trainer_keys:
        config += "stages:\n" + "".join(f"- {{name: {n}, steps: 30, optim: {{lr: 0.00{k + 1}}}}}\n"
                                         for k, n in enumerate(STAGES))
    run = _write_run(d, recs, config)
    gap = [{("recover_steps" if k == "recovery_steps" and trainer_keys else k): v for k, v in g.items()} for g in GAP]
    forgetting = {"domains": DOMAINS, "stages": STAGES, "matrix": MATRIX, "forgetting": FORGETTING,
                  "stability_gap": gap}
    (run / "forgetting.json").write_text(json.dumps(forgetting))
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _local_refs(html: str, folder: Path) -> list[str]:
    """Every src/href must be a file in the report folder or a data: URI; nothing may point at a network."""
    assert not re.search(r"https?:|//[a-z0-9]", html, re.I)
    assert "@import" not in html and "url(" not in html
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", html, re.I)
    for ref in refs:
        assert ref.startswith("data:") or (folder / ref).is_file(), ref
    return refs


@pytest.fixture
def report_cli(capsys):

    def run(*args) -> tuple[int, str, str]:
        rc = main(["report", *map(str, args)])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.mark.parametrize("trainer_keys", [False, True], ids=["alternate-keys", "trainer-keys"])
def test_three_stage_report(tmp_path, report_cli, trainer_keys):
    run = three_stage_run(tmp_path / "run", trainer_keys)
    if trainer_keys:
        (run / "forgetting.json").unlink()  # stage names then come from config.yaml
        assert report_cli(run)[0] == 0
        html = (run / "report" / "index.html").read_text()
        assert all(f"<td class=\"l\">{n}</td>" in html for n in STAGES) and "mean <code>replay</code>" in html
        assert "base 0.001, code-cpt 0.002, math-cpt 0.003" in html   # per-stage peak LR
        three_stage_run(tmp_path / "run2", trainer_keys)
        run = tmp_path / "run2"
    rc, out, _ = report_cli(run)
    assert rc == 0 and str(run / "report" / "index.html") in out
    folder = run / "report"
    html = (folder / "index.html").read_text()
    refs = _local_refs(html, folder)
    assert set(refs) == {"loss.png", "lr.png", "val_domains.png", "mixture.png", "forgetting.png"}
    for ref in refs:
        w, h = _png_size(folder / ref)
        assert w >= 300 and h >= 150
    # the heatmap's values, in the L[i][j] table, row by row
    table = html.split("Loss after each stage")[1].split("</table>")[0]
    for stage, row in zip(STAGES, MATRIX):
        assert re.search(r"<td[^>]*>" + re.escape(stage) + "</td>" + "".join(f"<td>{v:.3f}</td>" for v in row), table)
    forgetting = html.split("<h3>Forgetting</h3>")[1].split("</table>")[0]
    assert "<td>+0.500</td><td>+0.250</td><td>+0.000</td>" in forgetting and "<td>—</td>" in forgetting
    gap = html.split("Stability gap")[1].split("</table>")[0]
    assert "<td>+0.375</td><td>34</td><td>12</td>" in gap and "<td>+0.625</td><td>63</td><td>—</td>" in gap
    # summary and stage table from config.yaml / metrics.jsonl
    assert "synth" in html and "90 of 90" in html and "92,160" in html   # steps, tokens
    assert "3.1000" in html   # final train loss 4.0 - 0.01 * 90
    stages = html.split("<h2>Stages</h2>")[1].split("</table>")[0]
    assert "31–60" in stages and "<td>0.800</td>" in stages and "<td>0.200</td>" in stages
    assert "Single-stage run" not in html


def test_single_stage_report_skips_stage_sections(tmp_path, report_cli):
    run = single_stage_run(tmp_path / "run")
    out_dir = tmp_path / "elsewhere"
    assert report_cli(run, "--out", out_dir)[0] == 0
    html = (out_dir / "index.html").read_text()
    assert set(_local_refs(html, out_dir)) == {"loss.png", "lr.png"}
    assert "Single-stage run" in html and "Forgetting" not in html
    assert "60 of 60" in html and "3.1000" in html   # final loss 6.0 - 60 / 20
    assert "final validation bits per byte</td><td>1.0600 (step 60" in html
    assert not (run / "report").exists()


def test_rerun_replaces_figures(tmp_path, report_cli):
    run = three_stage_run(tmp_path / "run")
    assert report_cli(run)[0] == 0
    (run / "forgetting.json").unlink()  # e.g. a report made again from a copy without it
    assert report_cli(run)[0] == 0
    html = (run / "report" / "index.html").read_text()
    assert not (run / "report" / "forgetting.png").exists() and "No <code>forgetting.json</code>" in html


@pytest.mark.parametrize("make, expect", [
    (lambda d: d / "missing", "no such run directory"),
    (lambda d: d, "no metrics.jsonl"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n') and d, "metrics.jsonl:2"),
    (lambda d: _write_run(d / "r", [{"step": 1, "loss": 1.0}]) and
     (d / "r" / "forgetting.json").write_text('{"domains": ["a"], "stages": ["s"], "matrix": [[1, 2]]}') and d / "r",
     "'matrix' must be a 1 x 1"),
])
def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, make, expect):
    run = make(tmp_path)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err and err.count("\n") == 1


def test_missing_matplotlib_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    run = single_stage_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["report", str(run)]) == 2
    assert capsys.readouterr().err == ("error: stagewise report needs matplotlib: "
                                       "pip install 'stagewise[experiments]'\n")
    assert not (run / "report").exists()


def test_reading_a_run_imports_no_torch():
    # The report reads a run with stagewise.rundir (file names, read_metrics) and never needs torch.
    code = "import sys, stagewise.report\nfrom stagewise.report import load_run\nprint('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_torn_last_line_of_a_running_run_is_ignored(tmp_path, report_cli):
    run = single_stage_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 61, "tok')
    assert report_cli(run)[0] == 0


@pytest.mark.slow
@system_dep(shutil.which("chromium") is not None, "chromium")
def test_report_renders_in_headless_chromium(tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([sys.executable, str(REPO / "scripts" / "screenshot_report.py"), "--out", str(shot),
                    "--height", "1600"], check=True, timeout=300)
    assert _png_size(shot) == (1280, 1600)
    from PIL import Image

    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50   # a rendered page, not a blank or error screen
