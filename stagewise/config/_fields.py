"""The schema's field helper (shared by schema.py and post_training.py)."""

from __future__ import annotations

from dataclasses import field


def opt(default, help: str, **checks):
    """A schema field: default value, help text, optional validation bounds."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if isinstance(default, type):  # a nested section
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)
