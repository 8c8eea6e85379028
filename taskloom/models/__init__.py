"""Model definitions and loaders (one Llama-family definition, HF and GGUF weights)."""
