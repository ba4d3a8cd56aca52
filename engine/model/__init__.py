"""Llama-family model: weights loading (GGUF, safetensors), tokenizer and the forward pass."""
