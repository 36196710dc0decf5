"""Regenerate every experiment's table (results/<exp>.md) and figure (results/<exp>.png) from its
committed record (results/<exp>.json), without training:  python tables.py [EXPERIMENT ...]

`render(name)` returns the Markdown a record gives; tests/test_experiment_tables.py checks that the
committed tables equal it, so no table is typed by hand.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

# experiment -> (module, attribute holding table/plot; None: the module itself)
EXPERIMENTS = {
    "fp16_loss_scaling": ("fp16_loss_scaling", None),
    "bf16_pure": ("bf16_pure", None),
    "fp8_scaling": ("fp8_scaling", None),
    "ternary_transition": ("ternary_transition", None),
    "cpt_rewarm": ("cpt_rewarm", None),
    "cpt_replay": ("cpt_replay", None),
    "cpt_optimizer_state": ("cpt_replay", "State"),
    "sft_arithmetic": ("sft_arithmetic", None),
    "lora_variants": ("lora_variants", None),
    "dpo_sft_budget": ("dpo_sft_budget", None),
    "optimizers": ("optimizers", None),
}


def renderer(name: str):
    module, attr = EXPERIMENTS[name]
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def render(name: str) -> str:
    return renderer(name).table(c.load_record(name))


def main(names: list[str]) -> None:
    for name in names or [n for n in EXPERIMENTS if (c.RESULTS / f"{n}.json").exists()]:
        c.write_outputs(renderer(name))


if __name__ == "__main__":
    main(sys.argv[1:])
