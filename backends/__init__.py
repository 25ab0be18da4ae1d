"""Backends: one package per array library, each realising the op vocabulary of `gemma_core.graph`."""
