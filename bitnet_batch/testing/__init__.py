"""Test helpers: a small GGUF writer and random BitNet test models of any shape."""
