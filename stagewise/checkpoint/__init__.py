"""Checkpointing: resumable training state (DCP + JSON) and model export (safetensors).

- `save_checkpoint` / `load_checkpoint`: the full training state in
  `ckpt_root/step_XXXXXXXX/`, tensors via torch.distributed.checkpoint (so FSDP2 and a
  changed world size load the same files), everything else in `train_state.json`.
  Written to a temporary directory and renamed into place; the newest `keep_last` kept.
- `capture_rng` / `restore_rng`: generator states for `train_state`.
- `export_safetensors` / `load_model_state`: weights for other tools and for the next stage;
  `export_config(model_config)` is the config.json to export them with.

Loading never unpickles arbitrary objects (see `safe_dcp`).
"""

from stagewise.checkpoint.export import export_config, export_safetensors, load_model_state
from stagewise.checkpoint.rng import capture_rng, restore_rng
from stagewise.checkpoint.store import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

__all__ = [
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "export_config",
    "export_safetensors",
    "load_model_state",
]
