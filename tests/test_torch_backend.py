"""The PyTorch backend's own properties: in-place static caches, one tied embedding, devices,
and a compiled step that does not recompile (conformance and parity: test_backends.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gemma_core
from gemma_core.errors import BackendError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

torch = pytest.importorskip("torch")


def test_cache_is_static_and_updated_in_place() -> None:
    model = gemma_core.load("tiny-gemma3", backend="torch")
    out = model.forward(np.array([[2, 5, 6, 7]]), max_length=16)
    pointers = [layer[0].data_ptr() for layer in out.cache.layers]
    shapes = [tuple(layer[0].shape) for layer in out.cache.layers]
    cache = out.cache
    for token in range(8, 18):
        cache = model.forward(np.array([[token]]), cache=cache, last_only=True).cache
    assert [layer[0].data_ptr() for layer in cache.layers] == pointers
    assert [tuple(layer[0].shape) for layer in cache.layers] == shapes
    assert shapes[0][2] == 8 and shapes[5][2] == 16  # ring of W slots; global layer of max_length


def test_tied_embedding_is_one_tensor() -> None:
    config = get_preset("tiny-gemma")
    weights = random_weights(config, 0)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model = gemma_core.Model(config, weights, backend="torch")
    assert "lm_head.weight" not in model.weights
    head = next(op for op in model.graph if op.outputs == ("logits",))
    assert model.weights[head.params[0]] is model.weights["model.embed_tokens.weight"]


def test_outputs_and_devices() -> None:
    model = gemma_core.load("tiny-gemma3", backend="torch", dtype="bfloat16")
    logits = model.forward(np.array([[2, 3]])).logits
    assert logits.dtype == torch.bfloat16
    assert model.to_numpy(logits).dtype == np.float32
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="cuda is not available"):
            gemma_core.load("tiny-gemma", backend="torch", device="cuda")


@pytest.mark.slow
def test_compiled_step_matches_eager_without_recompiling() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = gemma_core.load("tiny-gemma3", backend="torch", compile=True)
    eager = gemma_core.load("tiny-gemma3", backend="torch")
    ids = np.array([[2, 5, 6, 7, 8]])
    c = compiled.forward(ids, max_length=16, last_only=True).cache
    e = eager.forward(ids, max_length=16, last_only=True).cache
    graphs = None
    for step, token in enumerate(range(9, 17)):
        oc = compiled.forward(np.array([[token]]), cache=c, last_only=True)
        oe = eager.forward(np.array([[token]]), cache=e, last_only=True)
        c, e = oc.cache, oe.cache
        np.testing.assert_allclose(compiled.to_numpy(oc.logits), eager.to_numpy(oe.logits), atol=1e-5)
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # decode steps 2..8 reused step 1's graph
