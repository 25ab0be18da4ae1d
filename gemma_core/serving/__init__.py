"""Serving: a continuous-batching engine over any backend (`engine`), and the OpenAI-compatible
HTTP server `gemma serve` runs on it (`server`, needing the `serve` extra)."""

from gemma_core.serving.engine import (
    Engine,
    EngineClosed,
    EngineMetrics,
    QueueFull,
    Request,
    SamplingParams,
    TokenEvent,
)

__all__ = ["Engine", "EngineClosed", "EngineMetrics", "QueueFull", "Request", "SamplingParams",
           "TokenEvent"]
