"""Search and scores: beam search equal to transformers' generate(num_beams=...), per-token
logprobs equal to transformers' output scores, the processors and stopping criteria against
transformers' own, transformers' calling style, the cache reorder, and errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hf_reference import hf_model

import gemma_core
from gemma_core.cache import reorder_cache
from gemma_core.errors import ConfigError, InputError
from gemma_core.processors import bad_words, log_softmax, min_new_tokens, no_repeat_ngram, top_entries
from gemma_core.weights import random_weights

PROMPTS = [[2, 10, 20, 30, 40, 50, 60, 70, 80, 90], [2, 11, 12]]
NEW = 12  # with the 10-token prompt, past tiny-gemma2/3's window of 8: the ring buffers reorder too
BEAM_CASES = {
    "plain": {"num_beams": 3},
    "return2-early": {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5,
                      "early_stopping": True},
    "never": {"num_beams": 3, "early_stopping": "never", "length_penalty": 2.0},
    "processors": {"num_beams": 3, "num_return_sequences": 3, "no_repeat_ngram_size": 2,
                   "repetition_penalty": 1.3, "min_new_tokens": 4},
}


def _untied(preset: str) -> gemma_core.GemmaConfig:
    # untied head: with a tied random head the argmax is mostly the current token, too easy
    return gemma_core.get_preset(preset).replace(tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pair(request: pytest.FixtureRequest) -> Any:
    """(our model, transformers' model) on the same random weights, per preset."""
    config = _untied(request.param)
    return gemma_core.Model(config, random_weights(config, 2)), hf_model(config, seed=2)


def _hf_beams(hf: Any, ids: np.ndarray, mask: np.ndarray, eos: list[int], **kw: Any) -> Any:
    import torch

    return hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                       do_sample=False, eos_token_id=eos or None, pad_token_id=0, output_scores=True,
                       return_dict_in_generate=True, **kw)


@pytest.mark.transformers
@pytest.mark.parametrize("pair", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"], indirect=True)
@pytest.mark.parametrize("case", list(BEAM_CASES))
def test_beam_search_equals_transformers(pair: Any, case: str) -> None:
    pytest.importorskip("torch")
    model, hf = pair
    kw = BEAM_CASES[case]
    ids, mask = gemma_core.batch_ids(PROMPTS)
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=[], **kw)
    # eos ids the beams do emit: some beams finish early, others run to the length
    eos = [free.token_ids[0][3], free.token_ids[-1][5]]
    ref = _hf_beams(hf, ids, mask, eos, **kw)
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=eos,
                          output_scores=True, top_logprobs=3, **kw)
    lengths = (ref.beam_indices + 1).bool().sum(1).tolist()  # each returned beam's generated length
    generated = ref.sequences[:, ids.shape[1]:].tolist()
    assert ours.token_ids == [row[:n] for row, n in zip(generated, lengths, strict=True)]
    if case != "never":  # a length penalty of 2 favours the beams that ran to the length
        assert "eos" in ours.finish_reasons
    for reason, tokens in zip(ours.finish_reasons, ours.token_ids, strict=True):
        assert (reason == "eos") == (tokens[-1] in eos)
    np.testing.assert_allclose(ours.sequence_scores, ref.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
    # per token: the processed log-softmax of the beam it came from (transformers' transition scores)
    steps = hf.compute_transition_scores(ref.sequences, ref.scores, ref.beam_indices, normalize_logits=False)
    for row, n in enumerate(lengths):
        np.testing.assert_allclose(ours.logprobs[row], steps[row, :n].numpy(), atol=1e-5)
        best = [top[0][1] for top in ours.top_logprobs[row]]  # type: ignore[index]
        assert all(b >= v - 1e-6 for b, v in zip(best, ours.logprobs[row], strict=True))
    assert ours.prompt_ids == [p for p in PROMPTS for _ in range(kw.get("num_return_sequences", 1))]
    assert ours.cache is None


@pytest.mark.transformers
@pytest.mark.parametrize("pair", ["tiny-gemma", "tiny-gemma3"], indirect=True)
def test_greedy_scores_and_processors_equal_transformers(pair: Any) -> None:
    """Token ids, logprobs and top-5 alternatives with every processor at once, a custom one
    among them, against transformers' output scores (log-softmaxed)."""
    torch = pytest.importorskip("torch")
    model, hf = pair
    ids, mask = gemma_core.batch_ids(PROMPTS)
    free = model.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=[])
    eos = [free.token_ids[1][6]]
    bad = [[free.token_ids[0][2]], [free.token_ids[0][4], free.token_ids[0][5]], eos]

    def odd_penalty(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        return scores - 0.5 * (np.arange(scores.shape[1]) % 2)  # a custom processor, numpy in and out

    kw = {"min_new_tokens": 3, "no_repeat_ngram_size": 2, "bad_words_ids": bad, "repetition_penalty": 1.2}
    custom = [lambda i, s: torch.from_numpy(odd_penalty(i.numpy(), s.numpy()))]
    ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                      do_sample=False, eos_token_id=eos, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True, logits_processor=custom, **kw)
    ours = model.generate(PROMPTS, max_new_tokens=NEW, eos_token_ids=eos, output_scores=True, top_logprobs=5,
                          logits_processor=[odd_penalty], **kw)
    scores = np.stack([log_softmax(s.numpy()) for s in ref.scores], axis=1)  # [B, steps, V]
    for row, tokens in enumerate(ours.token_ids):
        assert tokens == ref.sequences[row, ids.shape[1]:ids.shape[1] + len(tokens)].tolist()
        n = len(tokens)
        np.testing.assert_allclose(ours.logprobs[row], scores[row, np.arange(n), tokens], atol=1e-5)
        top_ids, top_lp = top_entries(scores[row, :n], 5)
        assert [[t for t, _ in step] for step in ours.top_logprobs[row]] == top_ids.tolist()  # type: ignore[index]
        np.testing.assert_allclose([[v for _, v in step] for step in ours.top_logprobs[row]], top_lp,  # type: ignore[index]
                                   atol=1e-5)
    assert not any(t == bad[0][0] for row in ours.token_ids for t in row)


@pytest.mark.transformers
def test_processors_equal_transformers_own(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from transformers import generation as tg

    scores = (rng.standard_normal((3, 40)) * 3).astype(np.float32)
    ids = np.array([[0, 0, 5, 6, 5, 6, 7, 5], [3, 4, 3, 4, 3, 9, 9, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    t, ti = torch.from_numpy(scores), torch.from_numpy(ids)
    words = [[7], [6, 5], [9, 9, 8], [4, 3, 11], [2]]  # [2] is the eos: filtered, as there
    for n in (1, 2, 3, 9):
        np.testing.assert_array_equal(no_repeat_ngram(ids, scores, n),
                                      tg.NoRepeatNGramLogitsProcessor(n)(ti, t.clone()).numpy())
    np.testing.assert_array_equal(bad_words(ids, scores, words, [2]),
                                  tg.NoBadWordsLogitsProcessor(words, eos_token_id=2)(ti, t.clone()).numpy())
    for generated in (2, 3, 4):
        hf = tg.MinNewTokensLengthLogitsProcessor(ids.shape[1] - generated, 3, [2, 5])
        np.testing.assert_array_equal(min_new_tokens(scores, generated, 3, [2, 5]), hf(ti, t.clone()).numpy())
    np.testing.assert_allclose(log_softmax(scores), torch.log_softmax(t, -1).numpy(), atol=1e-6)


@pytest.mark.transformers
@pytest.mark.parametrize("pair", ["tiny-gemma2"], indirect=True)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_stopping_criteria_equal_transformers(pair: Any, num_beams: int) -> None:
    """A per-row criterion (the row's last two tokens share parity) stops rows as there."""
    torch = pytest.importorskip("torch")
    model, hf = pair
    ids, mask = gemma_core.batch_ids(PROMPTS)

    def same_parity(ids: np.ndarray, scores: Any) -> np.ndarray:
        return ids[:, -1] % 2 == ids[:, -2] % 2

    ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=NEW,
                      do_sample=False, eos_token_id=None, pad_token_id=0, num_beams=num_beams,
                      stopping_criteria=[lambda i, s, **_: torch.from_numpy(same_parity(i.numpy(), s))],
                      return_dict_in_generate=True, output_scores=True)
    ours = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=[],
                          num_beams=num_beams, stopping_criteria=[same_parity])
    if num_beams > 1:
        lengths = (ref.beam_indices + 1).bool().sum(1).tolist()
    else:
        lengths = [len(t) for t in ours.token_ids]
    generated = ref.sequences[:, ids.shape[1]:].tolist()
    assert ours.token_ids == [row[:n] for row, n in zip(generated, lengths, strict=True)]
    assert "stopping_criteria" in ours.finish_reasons
    for row, (tokens, reason) in enumerate(zip(ours.token_ids, ours.finish_reasons, strict=True)):
        full = np.concatenate([ids[row], tokens])[None]
        assert (reason == "stopping_criteria") == bool(same_parity(full, None)[0])


@pytest.fixture(scope="module")
def tiny() -> gemma_core.Model:
    config = _untied("tiny-gemma3")
    return gemma_core.Model(config, random_weights(config, 4))


def test_transformers_calling_style(tiny: gemma_core.Model) -> None:
    ref = tiny.generate(PROMPTS, max_new_tokens=5, eos_token_ids=[])
    ids, mask = gemma_core.batch_ids(PROMPTS)
    assert tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, eos_token_ids=[]).token_ids \
        == ref.token_ids
    assert tiny.generate(input_ids=ids.tolist(), attention_mask=mask.tolist(), max_new_tokens=5,
                         eos_token_ids=[]).token_ids == ref.token_ids
    positional = tiny.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_ids=[])
    assert positional.token_ids == ref.token_ids
    inferred = tiny.generate(input_ids=ids, max_new_tokens=5, eos_token_ids=[])  # pads (id 0) masked out
    assert inferred.token_ids == ref.token_ids
    assert inferred.prompt_ids == PROMPTS
    assert tiny.generate(input_ids=np.array(PROMPTS[0]), max_new_tokens=5, eos_token_ids=[]).token_ids \
        == ref.token_ids[:1]
    right = np.array([[5, 6, 7], [5, 6, 0]])
    with pytest.raises(InputError, match="left padding"):
        tiny.generate(input_ids=right, attention_mask=(right != 0).astype(int), max_new_tokens=2)
    with pytest.raises(InputError, match="not both"):
        tiny.generate(PROMPTS, input_ids=ids, max_new_tokens=2)
    with pytest.raises(InputError, match="shape"):
        tiny.generate(input_ids=ids, attention_mask=mask[:, 1:], max_new_tokens=2)


def test_greedy_scores_are_the_chosen_tokens_logprobs(tiny: gemma_core.Model) -> None:
    res = tiny.generate(PROMPTS, max_new_tokens=4, eos_token_ids=[], output_scores=True, top_logprobs=2)
    assert res.logprobs is not None and res.top_logprobs is not None
    for row, tokens in enumerate(res.token_ids):
        assert [step[0][0] for step in res.top_logprobs[row]] == tokens  # greedy: the best one
        assert [step[0][1] for step in res.top_logprobs[row]] == res.logprobs[row]
        assert all(a[1] >= b[1] for a, b in res.top_logprobs[row])
        assert all(v < 0 for v in res.logprobs[row])
    plain = tiny.generate(PROMPTS, max_new_tokens=4, eos_token_ids=[])
    assert plain.logprobs is None and plain.token_ids == res.token_ids


def test_beam_scores_are_their_tokens_logprobs(tiny: gemma_core.Model) -> None:
    """Without a length penalty a beam's score is the sum of its tokens' logprobs, best first."""
    beams = tiny.generate(PROMPTS, max_new_tokens=6, eos_token_ids=[], num_beams=4, output_scores=True,
                          length_penalty=0.0, num_return_sequences=4)
    assert beams.sequence_scores is not None and beams.logprobs is not None
    for row in range(8):
        np.testing.assert_allclose(sum(beams.logprobs[row]), beams.sequence_scores[row], rtol=1e-5)
    for first in (0, 4):
        assert beams.sequence_scores[first:first + 4] == sorted(beams.sequence_scores[first:first + 4],
                                                                reverse=True)
        assert len({tuple(t) for t in beams.token_ids[first:first + 4]}) == 4  # distinct hypotheses


def test_reorder_cache_gathers_rows(tiny: gemma_core.Model) -> None:
    ids, mask = gemma_core.batch_ids([[2, 5, 6, 7], [2, 8], [2, 9, 10]])
    out = tiny.forward(ids, mask, max_length=12)
    before = tiny.export_cache(out.cache)
    rows = np.array([2, 0, 0, 1, 2])
    moved = reorder_cache(tiny.backend, out.cache, rows, tiny.dtype, tiny.device)
    after = tiny.export_cache(moved)
    for k0, k1, v0, v1 in zip(before.keys, after.keys, before.values, after.values, strict=True):
        np.testing.assert_array_equal(k1, k0[rows])
        np.testing.assert_array_equal(v1, v0[rows])
    np.testing.assert_array_equal(after.seen, before.seen[rows])
    np.testing.assert_array_equal(moved.valid, out.cache.valid[rows])
    np.testing.assert_array_equal(tiny.export_cache(out.cache).keys[0], before.keys[0])  # untouched
    with pytest.raises(InputError, match="rows"):
        reorder_cache(tiny.backend, out.cache, np.array([3]), tiny.dtype, tiny.device)


# tensorflow compiles a step per shape (~16 s here): slow
BACKENDS = ["torch", "jax", pytest.param("tensorflow", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_on_every_backend(backend: str) -> None:
    """Beam search, scores and processors on each framework backend equal numpy's."""
    pytest.importorskip({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend])
    config = _untied("tiny-gemma2")
    weights = random_weights(config, 5)
    kw = {"max_new_tokens": 6, "eos_token_ids": [], "num_beams": 3, "num_return_sequences": 2,
          "output_scores": True, "top_logprobs": 2, "no_repeat_ngram_size": 2}
    ref = gemma_core.Model(config, weights).generate(PROMPTS, **kw)
    ours = gemma_core.Model(config, weights, backend=backend).generate(PROMPTS, **kw)
    assert ours.token_ids == ref.token_ids
    np.testing.assert_allclose(ours.sequence_scores, ref.sequence_scores, atol=1e-4)  # type: ignore[arg-type]
    for a, b in zip(ours.logprobs, ref.logprobs, strict=True):  # type: ignore[arg-type]
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_search_errors(tiny: gemma_core.Model) -> None:
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"num_beams": 2, "num_return_sequences": 3}, InputError, "num_return_sequences"),
        ({"num_return_sequences": 2}, InputError, "beam search"),
        ({"num_beams": 0}, InputError, "num_beams"),
        ({"num_beams": 2, "do_sample": True}, InputError, "sampling"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, InputError, "early_stopping"),
        ({"num_beams": 2, "streamer": print}, InputError, "stream"),
        ({"num_beams": 2, "length_penalty": float("nan")}, InputError, "length_penalty"),
        ({"top_logprobs": -1}, InputError, "top_logprobs"),
        ({"bad_words_ids": [3, 4]}, ConfigError, "bad_words_ids"),
        ({"bad_words_ids": [[3], []]}, ConfigError, "bad_words_ids"),
        ({"bad_words_ids": [[10**6]]}, ConfigError, "vocabulary"),
        ({"no_repeat_ngram_size": -1}, ConfigError, "no_repeat_ngram_size"),
        ({"min_new_tokens": 1.5}, ConfigError, "min_new_tokens"),
        ({"logits_processor": lambda i, s: s}, ConfigError, "list"),
        ({"logits_processor": [lambda i, s: s[:, :3]]}, ConfigError, "shape"),
        ({"stopping_criteria": [lambda i, s: np.ones(7, bool)]}, ConfigError, "stopping_criteria"),
    ]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            tiny.generate(PROMPTS, max_new_tokens=2, **kw)


def test_min_new_tokens_and_scalar_criterion(tiny: gemma_core.Model) -> None:
    free = tiny.generate(PROMPTS[:1], max_new_tokens=6, eos_token_ids=[])
    eos = [free.token_ids[0][0]]  # the first greedy token: eos at once unless banned
    assert tiny.generate(PROMPTS[:1], max_new_tokens=6, eos_token_ids=eos).token_ids == [eos]
    held = tiny.generate(PROMPTS[:1], max_new_tokens=6, eos_token_ids=eos, min_new_tokens=3)
    assert eos[0] not in held.token_ids[0][:3]
    seen: list[int] = []

    def after_three(ids: np.ndarray, scores: np.ndarray) -> bool:
        seen.append(ids.shape[1])
        return ids.shape[1] >= len(PROMPTS[0]) + 3  # one bool for the whole batch

    res = tiny.generate(PROMPTS[:1], max_new_tokens=6, eos_token_ids=[], stopping_criteria=[after_three])
    assert res.token_ids == [free.token_ids[0][:3]]
    assert res.finish_reasons == ["stopping_criteria"]
    assert seen == [len(PROMPTS[0]) + 1, len(PROMPTS[0]) + 2, len(PROMPTS[0]) + 3]


def test_beam_search_stop_strings(spm_file: Any) -> None:
    from gemma_core.tokenizer import GemmaTokenizer

    config = _untied("tiny-gemma3")
    model = gemma_core.Model(config, random_weights(config, 3), tokenizer=GemmaTokenizer(spm_file))
    kw = {"max_new_tokens": 10, "eos_token_ids": [], "num_beams": 3, "num_return_sequences": 3}
    free = model.generate("Hello world", **kw)
    stop = free.texts[0][3:5]  # type: ignore[index]
    assert stop.strip()
    res = model.generate("Hello world", stop_strings=[stop], **kw)
    assert "stop_string" in res.finish_reasons
    for text, tokens, reason in zip(res.texts, res.token_ids, res.finish_reasons, strict=True):  # type: ignore[arg-type]
        full = model.tokenizer.decode(tokens, skip_special_tokens=True)
        assert stop not in text
        assert (reason == "stop_string") == (stop in full)
        if reason == "stop_string":
            assert stop not in model.tokenizer.decode(tokens[:-1], skip_special_tokens=True)  # at once
            assert text == full[:full.find(stop)]
