"""The experiments' tables are generated from their committed records, not typed by hand.

Each results/<experiment>.json holds every run's final numbers (and its curves); the Markdown
table beside it must be exactly what experiments/tables.py renders from that record. The noise
rule the tables apply is checked on hand-made numbers.
"""

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import _common as common  # noqa: E402
import tables  # noqa: E402

RECORDS = sorted(p.stem for p in (REPO / "experiments" / "results").glob("*.json"))


def test_every_experiment_has_a_record():
    assert set(RECORDS) == set(tables.EXPERIMENTS)


@pytest.mark.parametrize("name", RECORDS)
def test_committed_table_is_the_rendered_record(name):
    committed = (REPO / "experiments" / "results" / f"{name}.md").read_text()
    assert committed == tables.render(name)


@pytest.mark.parametrize("name", RECORDS)
def test_every_configuration_has_three_seeds(name):
    record = json.loads((REPO / "experiments" / "results" / f"{name}.json").read_text())
    seeds = {}
    for run in record["runs"]:
        seeds.setdefault(run["label"], []).append(run["seed"])
    assert seeds and all(len(set(s)) >= 3 for s in seeds.values()), seeds


def test_noise_rule_on_known_numbers():
    ref = [1.0, 1.5, 0.5]                       # seeds differ a lot from each other ...
    close = [1.02, 1.52, 0.52]                  # ... but each seed moves by +0.02 (std 0): an effect
    assert common.mean_std([1.0, 1.1, 0.9]) == pytest.approx((1.0, 0.1))
    assert common.is_effect(close, ref)
    assert common.delta_cell(close, ref) == "+0.020 ± 0.000 (effect)"
    mixed = [1.1, 1.45, 0.55]                   # differences +0.10, -0.05, +0.05: signs disagree
    assert not common.is_effect(mixed, ref)
    spread = [1.01, 1.6, 0.53]                  # +0.01, +0.10, +0.03: mean 0.047 < 2 x std 0.047
    assert not common.is_effect(spread, ref)
    assert common.delta_cell(ref, ref) == "—"
    assert common.cell([1.0, 1.1, 0.9]) == "1.000 ± 0.100"
