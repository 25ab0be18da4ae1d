"""Checkpoint formats other than the canonical Hugging Face folder, each a mapping to and from it."""
