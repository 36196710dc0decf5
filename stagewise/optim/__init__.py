from stagewise.optim.optimizer import build_optimizer, param_groups
from stagewise.optim.schedule import lr_at

__all__ = ["build_optimizer", "param_groups", "lr_at"]
