"""Transformers-style calls carried over (issue 19): framework tensors in and out of
`Model.forward`, `past_key_values` and `output_hidden_states`, a cache that grows as
transformers' DynamicCache and `crop_cache`, and the tokenizer's padding/truncation/tensor
options against transformers' GemmaTokenizer on the test SentencePiece model."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gemma_core
from gemma_core.cache import KVCache, grown_length
from gemma_core.errors import InputError
from gemma_core.model import Model
from gemma_core.presets import get_preset
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

FRAMEWORK = {"numpy": "numpy", "torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
BACKENDS = [b for b in FRAMEWORK if importlib.util.find_spec(FRAMEWORK[b]) is not None]
# float32 on every backend; steps differ from one full pass only by op order within a kernel
ATOL = 2e-5


def _native(backend: str, x: np.ndarray) -> Any:
    """`x` as the framework's own tensor, made the way a user of that framework would."""
    if backend == "torch":
        import torch

        return torch.tensor(x)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.array(x)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(x)
    return np.array(x)


def _is_native(backend: str, x: Any) -> bool:
    return type(x).__module__.split(".")[0] in {"numpy": ("numpy",), "torch": ("torch",),
                                                "jax": ("jax", "jaxlib"),
                                                "tensorflow": ("tensorflow",)}[backend]


@pytest.fixture(scope="module", params=BACKENDS)
def gemma2(request: pytest.FixtureRequest) -> Model:
    """tiny-gemma2 cut to one sliding layer (window 8) and one global. Eager, but jax jitted:
    its eager ops compile each primitive per new shape, several times slower than one jit."""
    jit = None if request.param == "jax" else False
    return gemma_core.load("tiny-gemma2", backend=request.param, compile=jit, num_layers=2)


def _ids(b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 500, (b, t))


# ---- tensors in and out ------------------------------------------------------------------------

def test_forward_takes_lists_numpy_and_native_tensors(gemma2: Model) -> None:
    name = gemma2.backend.name
    ids = _ids(2, 6)
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ref = gemma2.forward(ids, mask)
    assert _is_native(name, ref.logits) and ref.logits.shape == (2, 6, gemma2.config.vocab_size)
    for given_ids, given_mask in [(ids.tolist(), mask.tolist()), (_native(name, ids), _native(name, mask)),
                                  (ids.astype(np.int32), mask.astype(bool))]:
        out = gemma2(input_ids=given_ids, attention_mask=given_mask)
        assert _is_native(name, out.logits)
        np.testing.assert_array_equal(gemma2.to_numpy(out.logits), gemma2.to_numpy(ref.logits))
    with pytest.raises(InputError, match="input_ids"):
        gemma2.forward([[5, 6], [7]])  # ragged
    with pytest.raises(InputError, match="integer"):
        gemma2.forward(_native(name, np.array([[1.0, 2.0]])))


def test_past_key_values_and_hidden_states(gemma2: Model) -> None:
    c = gemma2.config
    ids = _ids(2, 5, seed=1)
    out = gemma2.forward(ids[:, :3], cache=gemma2.new_cache(2, 5))
    assert out.past_key_values is out.cache and out.hidden_states is None
    step = gemma2.forward(ids[:, 3:], past_key_values=out.past_key_values)
    whole = gemma2.forward(ids, output_hidden_states=True)
    np.testing.assert_allclose(gemma2.to_numpy(step.logits), gemma2.to_numpy(whole.logits)[:, 3:], atol=ATOL)
    # the residual stream equals what the base task (which always outputs it) computes
    jit = None if gemma2.backend.name == "jax" else False
    base = Model(c, random_weights(c, 0), backend=gemma2.backend, compile=jit, task="base").forward(ids)
    assert whole.hidden_states is not None and base.hidden_states is not None
    assert len(whole.hidden_states) == c.num_layers + 1
    for ours, theirs in zip(whole.hidden_states, base.hidden_states, strict=True):
        assert _is_native(gemma2.backend.name, ours) and tuple(ours.shape) == (2, 5, c.hidden_size)
        np.testing.assert_allclose(gemma2.to_numpy(ours), gemma2.to_numpy(theirs), atol=ATOL)
    np.testing.assert_allclose(gemma2.to_numpy(whole.last_hidden_state),
                               gemma2.to_numpy(base.last_hidden_state), atol=ATOL)
    with pytest.raises(InputError, match="past_key_values"):
        gemma2.forward(ids, cache=out.cache, past_key_values=out.cache)


# ---- the growing cache ---------------------------------------------------------------------------

def _export(model: Model, cache: Any) -> list[np.ndarray]:
    """The cache's contract form, pad slots zeroed: a pad's keys (it attends to whatever the
    step holds) depend on the cache size and the later tokens, a real token's do not."""
    state = model.export_cache(cache)
    pairs = zip(state.real * 2, state.keys + state.values, strict=True)  # keys, then values
    kept = [np.where(real[:, None, :, None], x, 0) for real, x in pairs]
    return [*kept, state.seen, *state.real]


def test_growing_cache_equals_a_big_static_one(gemma2: Model) -> None:
    """Prompt of 5 (one row left-padded), decode steps and chunks: the cache forward made grows
    5 -> 8 (the sliding ring grows too) -> 16 -> 32 (the ring, full and wrapped, is kept as it
    is), and every step's logits and the final cache equal those of one pass over a static cache
    of 32."""
    ids = _ids(2, 17, seed=2)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    static = gemma2.forward(ids, mask, cache=gemma2.new_cache(2, 32))
    want = gemma2.to_numpy(static.logits)
    grown: KVCache | None = None
    sizes = []
    for a, b in [(0, 5), (5, 6), (6, 9), (9, 16), (16, 17)]:
        before = None if grown is None else _export(gemma2, grown)
        out = gemma2.forward(ids[:, a:b], mask[:, a:b], cache=grown)
        if before is not None:  # the cache given is a value: growing it left it as it was
            assert all(np.array_equal(x, y) for x, y in zip(before, _export(gemma2, grown), strict=True))
        real = mask[:, a:b].astype(bool)  # a pad's logits depend on the cache size: compare real ones
        np.testing.assert_allclose(gemma2.to_numpy(out.logits)[real], want[:, a:b][real], atol=ATOL)
        grown = out.cache
        sizes.append(grown.max_length)
    assert grown is not None and grown.dynamic and not static.cache.dynamic
    assert sizes == [5, 8, 16, 16, 32]
    for x, y in zip(_export(gemma2, grown), _export(gemma2, static.cache), strict=True):
        np.testing.assert_allclose(x, y, atol=ATOL)


def test_static_cache_refuses_overflow_and_growth_stops_at_max_positions() -> None:
    model = gemma_core.load("tiny-gemma2", max_position_embeddings=12)
    ids = _ids(1, 12)
    with pytest.raises(InputError, match="static"):
        model.forward(ids[:, 4:6], cache=model.forward(ids[:, :4], cache=model.new_cache(1, 4)).cache)
    prefix = model.forward(ids[:, :4], cache=model.new_cache(1, 4, dynamic=True))
    out = model.forward(ids[:, 4:6], cache=prefix.cache)
    assert out.cache.max_length == 8
    out = model.forward(ids[:, 6:], cache=out.cache)
    assert out.cache.max_length == 12  # capped at max_position_embeddings
    with pytest.raises(InputError, match="max_position_embeddings"):
        model.forward(ids[:, :1], cache=out.cache)
    pairs = [(5, 6), (8, 9), (1, 2), (16, 17), (200, 201)]
    assert [grown_length(m, n, 256) for m, n in pairs] == [8, 16, 2, 32, 256]


# ---- crop ----------------------------------------------------------------------------------------

def test_crop_drops_the_last_tokens(gemma2: Model) -> None:
    """A crop to n, then other tokens, equals running the cropped sequence from scratch; the
    cropped cache was left as it was and continues as before."""
    ids = _ids(2, 7, seed=3)
    other = _ids(2, 3, seed=4)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    out = gemma2.forward(ids, mask)  # 7 tokens: no ring has wrapped (window 8)
    before = _export(gemma2, out.cache)
    for n in (4, -3):
        cropped = gemma2.crop_cache(out.cache, n)
        assert cropped.length == 4 and cropped.dynamic
        cont = gemma2.forward(other, cache=cropped)
        fresh = gemma2.forward(np.concatenate([ids[:, :4], other], 1),
                               np.concatenate([mask[:, :4], np.ones_like(other)], 1))
        np.testing.assert_allclose(gemma2.to_numpy(cont.logits), gemma2.to_numpy(fresh.logits)[:, 4:],
                                   atol=ATOL)
        for x, y in zip(_export(gemma2, cont.cache), _export(gemma2, fresh.cache), strict=True):
            np.testing.assert_allclose(x, y, atol=ATOL)
    assert all(np.array_equal(x, y) for x, y in zip(before, _export(gemma2, out.cache), strict=True))
    assert gemma2.crop_cache(out.cache, 9) is out.cache  # past the length: nothing to drop
    handed = gemma2.crop_cache(gemma2.copy_cache(out.cache), 2, donate_cache=True)
    assert handed.length == 2
    # a ring that wrapped lost the tokens its window would need
    wrapped = gemma2.forward(_ids(2, 10)).cache
    with pytest.raises(InputError, match="sliding ring"):
        gemma2.crop_cache(wrapped, 6)
    with pytest.raises(InputError, match="drop"):
        gemma2.crop_cache(out.cache, -8)


def test_crop_of_global_layers_after_many_tokens() -> None:
    """Gemma 1 has global layers only: a crop is always possible, and a static cache stays static."""
    model = gemma_core.load("tiny-gemma")
    ids, other = _ids(1, 12, seed=5), _ids(1, 2, seed=6)
    cache = model.forward(ids, cache=model.new_cache(1, 16)).cache
    cropped = model.crop_cache(cache, 5)
    assert not cropped.dynamic and cropped.max_length == 16 and list(cropped.seen) == [5]
    cont = model.forward(other, cache=cropped)
    fresh = model.forward(np.concatenate([ids[:, :5], other], 1))
    np.testing.assert_allclose(cont.logits, fresh.logits[:, 5:], atol=ATOL)


# ---- tokenizer -----------------------------------------------------------------------------------

TEXTS = ["Hello world, hello World!", "a", "The year 2024 had 366 days", "<start_of_turn>user\nhi"]


@pytest.fixture(scope="module")
def tok(spm_file: Path) -> GemmaTokenizer:
    return GemmaTokenizer(spm_file)


@pytest.fixture(scope="module")
def hf_tok(spm_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_tok_io")
    shutil.copy(spm_file, folder / "tokenizer.model")
    return transformers.GemmaTokenizer.from_pretrained(folder, add_bos_token=True)


@pytest.mark.parametrize("options", [
    {"padding": True},
    {"padding": "longest", "padding_side": "right"},
    {"padding": "max_length", "max_length": 24},
    {"padding": "max_length", "max_length": 5, "truncation": True, "padding_side": "right"},
    {"padding": True, "max_length": 3, "truncation": True},
    {"padding": True, "pad_to_multiple_of": 4},
    {"padding": True, "add_special_tokens": False},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_padded_batches_match_transformers(tok: GemmaTokenizer, hf_tok: Any, options: dict[str, Any]) -> None:
    ours = tok(TEXTS, return_tensors="np", **options)
    theirs = hf_tok(TEXTS, return_tensors="np", **options)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours[key], theirs[key])
        assert isinstance(ours[key], np.ndarray)
    default = tok(TEXTS, **options)  # return_tensors=None: numpy arrays when padded
    np.testing.assert_array_equal(default.input_ids, ours.input_ids)


def test_unpadded_lists_match_transformers(tok: GemmaTokenizer, hf_tok: Any) -> None:
    for options in ({"padding": False}, {"padding": False, "max_length": 4, "truncation": True}):
        ours, theirs = tok(TEXTS, **options), hf_tok(TEXTS, **options)
        assert ours.input_ids == theirs["input_ids"] and ours.attention_mask == theirs["attention_mask"]
    one = tok("Hello world", padding=False)
    assert one.input_ids == hf_tok("Hello world")["input_ids"]  # a flat list for one text
    assert dict(tok("a", padding=False).items()) == {"input_ids": tok.encode("a"), "attention_mask": [1, 1]}


def test_batch_decode_matches_transformers(tok: GemmaTokenizer, hf_tok: Any) -> None:
    ids = tok(TEXTS).input_ids  # left-padded: pads, BOS, a turn marker
    for skip in (False, True):
        theirs = hf_tok.batch_decode(ids, skip_special_tokens=skip)
        assert tok.batch_decode(ids, skip_special_tokens=skip) == theirs
        assert tok.batch_decode(ids.tolist(), skip) == theirs


@pytest.mark.parametrize("kind", ["pt", "jax", "tf"])
def test_return_tensors(tok: GemmaTokenizer, kind: str) -> None:
    module = {"pt": "torch", "jax": "jax", "tf": "tensorflow"}[kind]
    pytest.importorskip(module)
    enc = tok(TEXTS, return_tensors=kind)
    assert _is_native({"pt": "torch", "jax": "jax", "tf": "tensorflow"}[kind], enc.input_ids)
    np.testing.assert_array_equal(np.asarray(enc["input_ids"]), tok(TEXTS).input_ids)
    np.testing.assert_array_equal(np.asarray(enc.attention_mask), tok(TEXTS).attention_mask)
    assert tok.batch_decode(enc.input_ids, True) == tok.batch_decode(tok(TEXTS).input_ids, True)


def test_model_call_on_tokenizer_output(tok: GemmaTokenizer) -> None:
    """`model(**tokenizer(texts, return_tensors=...))` as in transformers, equal to numpy's run."""
    config = get_preset("tiny-gemma3").replace(num_layers=2)
    weights = random_weights(config, 0)
    ref = Model(config, weights, backend="numpy")(**tok(TEXTS[:2]))
    for name, kind in [("torch", "pt"), ("jax", "jax"), ("tensorflow", "tf")]:
        if name not in BACKENDS:
            continue
        model = Model(config, weights, backend=name, compile=None if name == "jax" else False)
        out = model(**tok(TEXTS[:2], return_tensors=kind))
        assert _is_native(name, out.logits)
        np.testing.assert_allclose(model.to_numpy(out.logits), ref.logits, atol=1e-4)


def test_tokenizer_bad_options(tok: GemmaTokenizer) -> None:
    with pytest.raises(InputError, match="needs max_length"):
        tok(TEXTS, padding="max_length")
    with pytest.raises(InputError, match="truncation=True"):
        tok(TEXTS, padding="max_length", max_length=3)
    with pytest.raises(InputError, match="padding=True"):
        tok(TEXTS, padding=False, return_tensors="np")
    with pytest.raises(InputError, match="return_tensors"):
        tok(TEXTS, return_tensors="mlx")
    with pytest.raises(InputError, match="padding_side"):
        tok(TEXTS, padding_side="middle")
    with pytest.raises(InputError, match="padding"):
        tok(TEXTS, padding="longer")
