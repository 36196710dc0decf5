"""Numeric precision: one Precision object per run, called by the step at fixed points (base.py)."""

from stagewise.config.schema import PrecisionConfig
from stagewise.precision.base import TF32, BF16Mixed, Precision
from stagewise.precision.fp16 import FP16Mixed, LossScaler
from stagewise.precision.pure_bf16 import BF16Pure, CompensatedAdamW
from stagewise.precision.quant import QUANT_MODES, FP8Mixed

MODES: dict[str, type[Precision]] = {c.name: c for c in (Precision, TF32, BF16Mixed, FP16Mixed, BF16Pure,
                                                         *QUANT_MODES)}


def build_precision(cfg: PrecisionConfig, device, completed_steps: int = 0) -> Precision:
    """The precision for the step after `completed_steps` (a precision schedule may have switched modes)."""
    from stagewise.precision.schedule import mode_at

    return MODES[mode_at(cfg, completed_steps)](device, cfg)


__all__ = ["MODES", "Precision", "TF32", "BF16Mixed", "FP16Mixed", "BF16Pure", "FP8Mixed", "LossScaler",
           "CompensatedAdamW", "build_precision"]
