"""Conversions between stagewise checkpoints and other ecosystems' formats (no runtime dependency on them)."""
