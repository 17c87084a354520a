"""Model files: the GGUF reader, ternary codecs, weight loading and the forward pass."""
