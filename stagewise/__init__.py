"""stagewise: a language model's whole training life, at any precision, resumable bit for bit."""

__version__ = "0.1.0"
