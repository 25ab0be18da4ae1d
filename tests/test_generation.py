"""Generation: greedy equal to transformers' generate, processors equal to transformers', sampling
statistics, stopping, streaming, batching, and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hf_reference import hf_model

import gemma_core
from gemma_core.errors import ConfigError, InputError
from gemma_core.sampling import SamplingConfig, choose, min_p, process, repetition_penalty, top_k, top_p
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

PROMPTS = [[2, 10, 20, 30, 40, 50, 60, 70, 80, 90], [2, 11, 12]]


@pytest.mark.transformers
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("penalty", [None, 1.3])
def test_greedy_equals_transformers_generate(preset: str, penalty: float | None) -> None:
    torch = pytest.importorskip("torch")
    # untied head: with a tied random head the argmax is mostly the current token, too easy
    config = gemma_core.get_preset(preset).replace(tie_word_embeddings=False)
    hf = hf_model(config, seed=2)
    model = gemma_core.Model(config, random_weights(config, 2))
    ids, mask = gemma_core.batch_ids(PROMPTS)
    ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=16,
                      do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=penalty)
    ours = model.generate(PROMPTS, max_new_tokens=16, eos_token_ids=[], repetition_penalty=penalty)
    assert ours.token_ids == ref[:, ids.shape[1]:].tolist()
    assert ours.finish_reasons == ["length", "length"]


# ---- processors against transformers' own ---------------------------------------------------

@pytest.mark.transformers
def test_processors_equal_transformers(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from transformers import generation as tg

    scores = (rng.standard_normal((3, 50)) * 3).astype(np.float32)
    history = [[1, 2, 3, 3], [4], [5, 6]]
    t = torch.from_numpy(scores)
    ids = torch.tensor([[1, 2, 3, 3], [4, 4, 4, 4], [5, 6, 6, 5]])
    pairs = [
        (repetition_penalty(scores, history, 1.5), tg.RepetitionPenaltyLogitsProcessor(1.5)(ids, t)),
        (top_k(scores, 5), tg.TopKLogitsWarper(5)(ids, t)),
        (top_p(scores, 0.8), tg.TopPLogitsWarper(0.8)(ids, t)),
        (min_p(scores, 0.1), tg.MinPLogitsWarper(0.1)(ids, t)),
    ]
    for ours, ref in pairs:
        np.testing.assert_array_equal(ours, ref.numpy())


def test_processor_order_matches_transformers() -> None:
    """Temperature before top-p: a hot temperature widens the nucleus."""
    scores = np.array([[4.0, 3.0, 2.0, 1.0, 0.0]], np.float32)
    cold = process(scores, SamplingConfig(do_sample=True, temperature=0.5, top_p=0.9), [[]])
    hot = process(scores, SamplingConfig(do_sample=True, temperature=4.0, top_p=0.9), [[]])
    assert np.isfinite(cold).sum() < np.isfinite(hot).sum()


def test_top_k_never_emits_outside_the_k_best(rng: np.random.Generator) -> None:
    scores = rng.standard_normal((1, 100)).astype(np.float32)
    cfg = SamplingConfig(do_sample=True, top_k=3)
    best = set(np.argsort(scores[0])[-3:].tolist())
    draws = {int(choose(process(scores, cfg, [[]]), cfg, np.random.default_rng(s))[0]) for s in range(300)}
    assert draws <= best
    assert len(draws) == 3


def test_sampling_follows_the_distribution() -> None:
    scores = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    cfg = SamplingConfig(do_sample=True)
    gen = np.random.default_rng(0)
    counts = np.bincount([int(choose(scores, cfg, gen)[0]) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_sampling_config_errors() -> None:
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(do_sample=True, top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(do_sample=True, temperature=-1)
    with pytest.raises(ConfigError, match="need sampling"):
        SamplingConfig(do_sample=False, top_k=5)


# ---- the generation loop ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(spm_file: Path) -> gemma_core.Model:
    config = gemma_core.get_preset("tiny-gemma3").replace(tie_word_embeddings=False)
    return gemma_core.Model(config, random_weights(config, 3), tokenizer=GemmaTokenizer(spm_file))


def test_seeded_sampling_is_reproducible(model: gemma_core.Model) -> None:
    kw = {"max_new_tokens": 8, "temperature": 1.5, "top_k": 50, "eos_token_ids": []}
    a = model.generate("Hello world", seed=5, **kw)
    b = model.generate("Hello world", seed=5, **kw)
    c = model.generate("Hello world", seed=6, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_text_results_and_streaming(model: gemma_core.Model) -> None:
    pieces: list[str] = []
    res = model.generate("Hello world", max_new_tokens=10, eos_token_ids=[],
                         streamer=lambda e: pieces.append(e.text_deltas[0]))
    assert res.texts is not None
    assert "".join(pieces) == res.texts[0]
    assert res.texts[0] == model.tokenizer.decode(res.token_ids[0], skip_special_tokens=True)
    assert len(res.token_ids[0]) == 10


def test_stops_on_eos_and_reports_it(model: gemma_core.Model) -> None:
    free = model.generate("Hello world", max_new_tokens=6, eos_token_ids=[])
    eos = free.token_ids[0][2]
    res = model.generate("Hello world", max_new_tokens=6, eos_token_ids=[eos])
    assert res.token_ids[0] == free.token_ids[0][:free.token_ids[0].index(eos) + 1]
    assert res.finish_reasons == ["eos"]


def test_stop_strings_cut_text(model: gemma_core.Model) -> None:
    free = model.generate("Hello world", max_new_tokens=12, eos_token_ids=[])
    text = free.texts[0]  # type: ignore[index]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop
    pieces: list[str] = []
    res = model.generate("Hello world", max_new_tokens=12, eos_token_ids=[], stop_strings=[stop],
                         streamer=lambda e: pieces.append(e.text_deltas[0]))
    assert res.finish_reasons == ["stop_string"]
    assert res.texts == [text[:text.find(stop)]]
    assert "".join(pieces) == res.texts[0]  # the stream never showed the stop string


def test_batch_rows_equal_single_runs(model: gemma_core.Model) -> None:
    prompts = ["Hello world, hello", "a"]
    batch = model.generate(prompts, max_new_tokens=6, eos_token_ids=[])
    for row, prompt in enumerate(prompts):
        assert batch.token_ids[row] == model.generate(prompt, max_new_tokens=6, eos_token_ids=[]).token_ids[0]


def test_generation_errors(model: gemma_core.Model) -> None:
    with pytest.raises(InputError, match="empty"):
        model.generate("")
    with pytest.raises(InputError, match="exceed the model's context of 256 tokens"):
        model.generate("Hello", max_new_tokens=300)
    with pytest.raises(InputError, match="max_new_tokens"):
        model.generate("Hello", max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature: 0 means greedy decoding, but sampling"):
        model.generate("Hello", temperature=0, do_sample=True)
    bare = gemma_core.load("tiny-gemma")
    with pytest.raises(InputError, match="no tokenizer"):
        bare.generate("Hello")
    assert bare.generate([2, 5, 6], max_new_tokens=2).texts is None
