"""Greedy decoding reduces the logits on the device (`Backend.greedy_tokens`): the same ids as
numpy's argmax of the float32 logits, ties included, and the same generation as the host path."""

from __future__ import annotations

import numpy as np
import pytest

import gemma_core
from gemma_core.backend import get_backend

BACKENDS = gemma_core.installed_backends()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_id_in_every_dtype(backend: str) -> None:
    be = get_backend(backend)
    rng = np.random.default_rng(0)
    for vocab in (7, 1000, 262144):
        # few distinct values: most rows have several maximal entries
        logits = rng.integers(-3, 4, (3, 2, vocab)).astype(np.float32)
        logits[1, -1, vocab // 2:] = 9.0  # a tie from the middle of the vocabulary on
        for dtype in be.dtypes:
            x = be.convert_weight(logits, dtype, None)
            want = be.to_numpy(x)[:, -1].astype(np.float32).argmax(-1)
            got = be.greedy_tokens(x)
            assert got.dtype == np.int64 and got.shape == (3,)
            np.testing.assert_array_equal(got, want, err_msg=f"{backend} {dtype} vocab {vocab}")
    if "float64" in be.dtypes:  # float64 logits are compared as float32, as transformers casts
        near = np.zeros((1, 1, 8))
        near[0, 0, 1], near[0, 0, 3] = 1.0, 1.0 + 1e-12  # one float32 value
        assert be.greedy_tokens(be.convert_weight(near, "float64", None)).tolist() == [1]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "array_api"])
def test_device_greedy_generates_the_host_path(backend: str) -> None:
    model = gemma_core.load("tiny-gemma3", backend=backend, tie_word_embeddings=False)
    prompts = [[2, 10, 20, 30], [2, 11]]
    kw = {"max_new_tokens": 8, "eos_token_ids": []}
    seen = []
    reduce = model.backend.greedy_tokens

    def spy(logits):  # type: ignore[no-untyped-def]
        seen.append(1)
        return reduce(logits)

    model.backend.greedy_tokens = spy  # type: ignore[method-assign]
    try:
        fast = model.generate(prompts, **kw).token_ids
        assert len(seen) == 8
        # a processor that returns the scores as they are forces the host path
        host = model.generate(prompts, logits_processor=[lambda ids, s: s], **kw).token_ids
        assert len(seen) == 8
    finally:
        del model.backend.greedy_tokens
    assert fast == host
