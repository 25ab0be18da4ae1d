"""Speculative decoding (`gemma_core.speculative`): prompt lookup and a draft model give exactly
plain greedy decoding's ids (float64 and float32 on numpy, torch), stopping mid-chunk on eos,
length and stop strings; the n-gram rule and the ids equal transformers'; errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hf_reference import save_hf

import gemma_core
from gemma_core.errors import InputError
from gemma_core.speculative import prompt_lookup
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

PRESETS = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]
PROMPT = [2] + [5, 6, 7, 8, 9] * 4  # 21 tokens: past tiny-gemma2/3's window of 8 (rings wrap)


def _config(preset: str) -> gemma_core.GemmaConfig:
    # untied head: with a tied random head the argmax mostly repeats the last token (all accepted)
    return gemma_core.get_preset(preset).replace(tie_word_embeddings=False)


def _perturbed(config: gemma_core.GemmaConfig, seed: int, eps: float) -> dict[str, np.ndarray]:
    """The target's weights plus relative noise: a draft that agrees often, not always."""
    rng = np.random.default_rng(9)
    return {k: v + (eps * np.abs(v).mean() * rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in random_weights(config, seed).items()}


def _pair(preset: str, dtype: str = "float32", backend: str | None = None,
          eps: float = 0.2) -> tuple[gemma_core.Model, gemma_core.Model]:
    config = _config(preset)
    target = gemma_core.Model(config, random_weights(config, 2), dtype=dtype, backend=backend)
    draft = gemma_core.Model(config, _perturbed(config, 2, eps), dtype=dtype, backend=backend)
    return target, draft


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("preset", PRESETS)
def test_equals_greedy_on_numpy(preset: str, dtype: str) -> None:
    target, draft = _pair(preset, dtype)
    ref = target.generate(PROMPT, max_new_tokens=40, eos_token_ids=[])
    lookup = target.generate(PROMPT, max_new_tokens=40, eos_token_ids=[], prompt_lookup_num_tokens=4)
    drafted = target.generate(PROMPT, max_new_tokens=40, eos_token_ids=[], assistant_model=draft,
                              num_assistant_tokens=5)
    assert lookup.token_ids == ref.token_ids
    assert drafted.token_ids == ref.token_ids
    assert lookup.finish_reasons == drafted.finish_reasons == ["length"]
    assert 0 < lookup.acceptance_rate < 1  # type: ignore[operator]  # both accepts and rejects ran
    assert 0 < drafted.acceptance_rate < 1  # type: ignore[operator]
    assert ref.acceptance_rate is None


def test_identical_draft_accepts_everything() -> None:
    target, _ = _pair("tiny-gemma3", "float64")
    res = target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[], assistant_model=target,
                          num_assistant_tokens=6, assistant_confidence_threshold=0)
    assert res.token_ids == target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[]).token_ids
    assert res.acceptance_rate == 1.0


def test_smaller_draft_with_the_same_vocabulary() -> None:
    target, _ = _pair("tiny-gemma3", "float64")
    small = _config("tiny-gemma3").replace(num_layers=2, hidden_size=32, intermediate_size=64)
    draft = gemma_core.Model(small, random_weights(small, 4), dtype="float64")
    res = target.generate(PROMPT, max_new_tokens=20, eos_token_ids=[], assistant_model=draft,
                          assistant_confidence_threshold=0)
    assert res.token_ids == target.generate(PROMPT, max_new_tokens=20, eos_token_ids=[]).token_ids


def test_result_cache_holds_all_but_the_last_token() -> None:
    """As plain greedy's: the prompt and every generated token but the last, also where the
    last chunk wrapped a sliding ring and was rejected in part (the cache from before it, fed)."""
    target, draft = _pair("tiny-gemma2", "float64")
    free = target.generate(PROMPT, max_new_tokens=20, eos_token_ids=[]).token_ids[0]
    # stopped by length (every candidate of the last chunk kept) or by eos (some dropped)
    for n, eos in [(9, []), (17, []), *((20, [t]) for t in dict.fromkeys(free[4:]))]:
        ref = target.generate(PROMPT, max_new_tokens=n, eos_token_ids=eos)
        theirs = target.export_cache(ref.cache)
        for kw in ({"prompt_lookup_num_tokens": 5}, {"assistant_model": draft}):
            res = target.generate(PROMPT, max_new_tokens=n, eos_token_ids=eos, **kw)  # type: ignore[arg-type]
            assert res.token_ids == ref.token_ids
            assert res.cache.length == ref.cache.length == len(PROMPT) + len(ref.token_ids[0]) - 1
            ours = target.export_cache(res.cache)
            for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
            assert (ours.seen == theirs.seen).all()


@pytest.mark.parametrize("source", ["lookup", "draft"])
def test_eos_inside_a_chunk(source: str) -> None:
    target, _ = _pair("tiny-gemma", "float64")
    free = target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[]).token_ids[0]
    kw = ({"prompt_lookup_num_tokens": 8} if source == "lookup"
          else {"assistant_model": target, "num_assistant_tokens": 8, "assistant_confidence_threshold": 0})
    # every distinct generated token as eos: some fall inside an accepted chunk, some are its bonus
    for eos in dict.fromkeys(free[3:]):
        ref = target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[eos])
        res = target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[eos], **kw)  # type: ignore[arg-type]
        assert res.token_ids == ref.token_ids == [free[:free.index(eos) + 1]]
        assert res.finish_reasons == ["eos"]


@pytest.mark.parametrize("source", ["lookup", "draft"])
def test_max_new_tokens_inside_a_chunk(source: str) -> None:
    target, draft = _pair("tiny-gemma3", "float64", eps=0.05)
    free = target.generate(PROMPT, max_new_tokens=24, eos_token_ids=[]).token_ids[0]
    kw = {"prompt_lookup_num_tokens": 5} if source == "lookup" else {"assistant_model": draft}
    for n in range(1, 25):
        res = target.generate(PROMPT, max_new_tokens=n, eos_token_ids=[], **kw)  # type: ignore[arg-type]
        assert res.token_ids == [free[:n]]
        assert res.finish_reasons == ["length"]


def test_processors_and_scores_as_greedy() -> None:
    target, draft = _pair("tiny-gemma2", "float64")
    kw = {"max_new_tokens": 24, "eos_token_ids": [], "repetition_penalty": 1.3, "no_repeat_ngram_size": 3,
          "output_scores": True, "top_logprobs": 3}
    ref = target.generate(PROMPT, **kw)  # type: ignore[arg-type]
    for extra in ({"prompt_lookup_num_tokens": 3}, {"assistant_model": draft}):
        res = target.generate(PROMPT, **kw, **extra)  # type: ignore[arg-type]
        assert res.token_ids == ref.token_ids
        np.testing.assert_allclose(res.logprobs[0], ref.logprobs[0], atol=1e-5)  # type: ignore[index]
        assert [[t for t, _ in step] for step in res.top_logprobs[0]] == \
            [[t for t, _ in step] for step in ref.top_logprobs[0]]  # type: ignore[index]


def test_stopping_criteria_inside_a_chunk() -> None:
    target, _ = _pair("tiny-gemma", "float64")
    free = target.generate(PROMPT, max_new_tokens=20, eos_token_ids=[]).token_ids[0]
    stop_at = len(PROMPT) + 7  # the 7th new token

    def criterion(ids: np.ndarray, scores: np.ndarray) -> bool:
        return ids.shape[1] >= stop_at

    res = target.generate(PROMPT, max_new_tokens=20, eos_token_ids=[], stopping_criteria=[criterion],
                          assistant_model=target, num_assistant_tokens=10, assistant_confidence_threshold=0)
    assert res.token_ids == [free[:7]]
    assert res.finish_reasons == ["stopping_criteria"]


@pytest.fixture(scope="module")
def text_model(spm_file: Path) -> gemma_core.Model:
    config = _config("tiny-gemma3")
    return gemma_core.Model(config, random_weights(config, 3), tokenizer=GemmaTokenizer(spm_file))


def test_stop_strings_and_streaming(text_model: gemma_core.Model) -> None:
    prompt = "Hello world, hello world, hello world"
    free = text_model.generate(prompt, max_new_tokens=16, eos_token_ids=[])
    text = free.texts[0]  # type: ignore[index]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop
    ref = text_model.generate(prompt, max_new_tokens=16, eos_token_ids=[], stop_strings=[stop])
    pieces: list[str] = []
    res = text_model.generate(prompt, max_new_tokens=16, eos_token_ids=[], stop_strings=[stop],
                              prompt_lookup_num_tokens=6, streamer=lambda e: pieces.append(e.text_deltas[0]))
    assert res.finish_reasons == ["stop_string"]
    assert res.token_ids == ref.token_ids
    assert res.texts == ref.texts == [text[:text.find(stop)]]
    assert "".join(pieces) == res.texts[0]  # the stream never showed the stop string
    assert len(pieces) == len(res.token_ids[0])  # one event per token, as plain greedy


@pytest.mark.parametrize("preset", PRESETS)
def test_equals_greedy_on_torch(preset: str) -> None:
    pytest.importorskip("torch")
    target, draft = _pair(preset, "float32", backend="torch")
    ref = target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[])
    for kw in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": draft, "num_assistant_tokens": 4}):
        res = target.generate(PROMPT, max_new_tokens=30, eos_token_ids=[], **kw)  # type: ignore[arg-type]
        assert res.token_ids == ref.token_ids


# ---- against transformers -------------------------------------------------------------------

SEQUENCES = [[1, 2, 3, 4, 1, 2, 3], [5, 5, 5, 5], [1, 2, 9, 2, 7, 1, 2], [3, 4, 5], [7], [1, 2, 1, 3, 1]]


@pytest.mark.transformers
@pytest.mark.parametrize("seq", SEQUENCES)
@pytest.mark.parametrize(("k", "ngram"), [(3, 2), (1, 1), (10, 3)])
def test_prompt_lookup_rule_equals_transformers(seq: list[int], k: int, ngram: int) -> None:
    torch = pytest.importorskip("torch")
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    for eos in ((), (3,)):
        gen = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(eos) if eos else None,
                                             num_output_tokens=k, max_matching_ngram_size=ngram,
                                             max_length=100)
        ids = torch.tensor([seq])
        cand, _ = gen.get_candidates(ids)
        assert prompt_lookup(seq, k, ngram, eos) == cand[0, len(seq):].tolist()


@pytest.mark.transformers
@pytest.mark.parametrize("preset", PRESETS)
def test_prompt_lookup_equals_transformers_generate(preset: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import transformers

    config = _config(preset)
    folder = save_hf(config, tmp_path / "hf", seed=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ours = gemma_core.load(folder, dtype="float32")
    for k in (2, 6):
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=0, prompt_lookup_num_tokens=k)
        res = ours.generate(PROMPT, max_new_tokens=24, eos_token_ids=[], prompt_lookup_num_tokens=k)
        assert res.token_ids == ref[:, len(PROMPT):].tolist()


# ---- errors ---------------------------------------------------------------------------------

def test_refusals() -> None:
    target, draft = _pair("tiny-gemma")
    other = gemma_core.get_preset("tiny-gemma").replace(vocab_size=640)
    with pytest.raises(InputError, match="batch size 1"):
        target.generate([PROMPT, PROMPT], prompt_lookup_num_tokens=3)
    with pytest.raises(InputError, match="vocabulary"):
        target.generate(PROMPT, assistant_model=gemma_core.Model(other, random_weights(other, 0)))
    with pytest.raises(InputError, match="greedy only"):
        target.generate(PROMPT, prompt_lookup_num_tokens=3, do_sample=True)
    with pytest.raises(InputError, match="beam search"):
        target.generate(PROMPT, assistant_model=draft, num_beams=2)
    with pytest.raises(InputError, match="one source"):
        target.generate(PROMPT, assistant_model=draft, prompt_lookup_num_tokens=3)
    with pytest.raises(InputError, match="prompt_lookup_num_tokens"):
        target.generate(PROMPT, prompt_lookup_num_tokens=0)
    with pytest.raises(InputError, match="applies to assistant_model"):
        target.generate(PROMPT, prompt_lookup_num_tokens=3, num_assistant_tokens=4)
    with pytest.raises(InputError, match="causal-lm"):
        target.generate(PROMPT, assistant_model="gemma-3-270m")
    with pytest.raises(InputError, match="continue a cache"):
        target.generate(PROMPT, prompt_lookup_num_tokens=3, cache=target.forward([PROMPT]).cache)


# ---- the command line -----------------------------------------------------------------------

def test_cli_prompt_lookup_and_draft_model(tiny_model_folder: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from gemma_core.cli import main

    prompt = "Hello world, hello world, hello"
    base = ["generate", "--model", str(tiny_model_folder), "--max-new-tokens", "12"]
    assert main([*base, prompt]) == 0
    plain = capsys.readouterr().out
    assert main(["--verbose", *base, "--prompt-lookup", "4", prompt]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    assert "speculative acceptance" in out.err
    assert main([*base, "--draft-model", str(tiny_model_folder), prompt]) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--draft-model", str(tiny_model_folder), "--prompt-lookup", "4", prompt]) == 2
    assert "one of them" in capsys.readouterr().err
    assert main([*base, "--prompt-lookup", "4", "--num-beams", "2", prompt]) == 2
    assert "beam search" in capsys.readouterr().err
