from stagewise.precision.base import BF16Mixed, Precision, build_precision

__all__ = ["Precision", "BF16Mixed", "build_precision"]
