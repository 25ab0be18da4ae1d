"""Test helpers for the serving engine."""

from __future__ import annotations

import time

from gemma_core.serving.engine import Engine


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Whether the engine's queue and batch emptied within `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = engine.metrics()
        if m.queue_depth == 0 and m.active == 0:
            return True
        time.sleep(0.01)
    return False
