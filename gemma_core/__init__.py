"""gemma-core: Gemma 1/2/3 text models as one backend-neutral spec, realised by several backends.

This package imports numpy only; frameworks are imported by the backend asked for.
"""

from gemma_core.backend import Backend, get_backend, installed_backends, known_backends
from gemma_core.cache import CacheState, KVCache, batch_ids
from gemma_core.config import Architecture, AttentionKind, GemmaConfig
from gemma_core.errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    GemmaError,
    InputError,
    WeightError,
)
from gemma_core.graph import OP_KINDS, Graph, GraphError, Op, build_graph, format_graph
from gemma_core.layout import param_count, validate_weights
from gemma_core.loading import load
from gemma_core.model import ForwardOutput, Model
from gemma_core.presets import PRESETS, get_preset

__all__ = [
    "OP_KINDS", "PRESETS", "Architecture", "AttentionKind", "Backend", "BackendError", "CacheState",
    "CheckpointError", "ConfigError", "ForwardOutput", "GemmaConfig", "GemmaError", "Graph",
    "GraphError", "InputError", "KVCache", "Model", "Op", "WeightError", "batch_ids", "build_graph",
    "format_graph", "get_backend", "get_preset", "installed_backends", "known_backends", "load",
    "param_count", "validate_weights",
]
__version__ = "0.1.0"
