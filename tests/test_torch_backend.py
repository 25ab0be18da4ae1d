"""The PyTorch backend: conformance with the reference, transformers on the same weights,
in-place static caches, one tied embedding, and a compiled step that does not recompile."""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import hf_forward, hf_model

import gemma_core
from conformance import run_conformance
from gemma_core.errors import BackendError
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

torch = pytest.importorskip("torch")


def test_conformance_float32_bfloat16_float16() -> None:
    results = run_conformance(["torch"], ("float32", "bfloat16", "float16"))
    failed = [r for r in results if r.status == "fail"]
    assert not failed, failed
    assert sum(r.status == "pass" for r in results) >= 30


@pytest.mark.transformers
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_logits_match_transformers(preset: str) -> None:
    config = get_preset(preset).replace(**({"attn_logit_softcap": 0.5} if preset == "tiny-gemma2" else {}))
    model = gemma_core.Model(config, random_weights(config, 4), backend="torch")
    ids, mask = gemma_core.batch_ids([list(range(3, 23)), list(range(30, 39))])
    ref, _ = hf_forward(hf_model(config, seed=4), ids, mask)
    ours = model.to_numpy(model.forward(ids, mask).logits)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4 * ref[real].std()


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


def test_generation_equals_numpy() -> None:
    ours = gemma_core.load("tiny-gemma3", backend="torch", tie_word_embeddings=False)
    ref = gemma_core.load("tiny-gemma3", tie_word_embeddings=False)
    prompts = [[2, 10, 20, 30], [2, 11]]
    kw = {"max_new_tokens": 10, "eos_token_ids": []}
    assert ours.generate(prompts, **kw).token_ids == ref.generate(prompts, **kw).token_ids
    sampled = {"temperature": 0.9, "top_k": 20, "seed": 3, **kw}
    assert ours.generate(prompts, **sampled).token_ids == ours.generate(prompts, **sampled).token_ids


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
