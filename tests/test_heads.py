"""Task heads (base, sequence classification, token classification) against transformers'
classes on the same random weights, with left-padded batches, on every installed backend."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gemma_core
from gemma_core.errors import ConfigError, WeightError
from gemma_core.presets import get_preset

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.transformers

SEQ = {"tiny-gemma": "GemmaForSequenceClassification", "tiny-gemma2": "Gemma2ForSequenceClassification",
       "tiny-gemma3": "Gemma3TextForSequenceClassification"}
TOK = {"tiny-gemma": "GemmaForTokenClassification", "tiny-gemma2": "Gemma2ForTokenClassification"}
LABELS = ["negative", "neutral", "positive"]




def _hf(preset: str, cls_name: str, folder):  # type: ignore[no-untyped-def]
    config = get_preset(preset)
    hf_config = transformers.AutoConfig.for_model(
        **config.to_hf(), id2label=dict(enumerate(LABELS)), label2id={v: i for i, v in enumerate(LABELS)})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(hf_config).eval()
    with torch.no_grad():  # non-trivial norms (transformers initialises them to zero)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("score.bias"):
                p.normal_(0, 0.1)
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    return model


def _batch() -> tuple[np.ndarray, np.ndarray]:
    return gemma_core.batch_ids([list(range(3, 17)), list(range(40, 46))])


@pytest.mark.parametrize("backend", gemma_core.installed_backends())
@pytest.mark.parametrize("preset", sorted(SEQ))
def test_sequence_classification_matches_transformers(tmp_path, preset: str, backend: str) -> None:  # type: ignore[no-untyped-def]
    hf = _hf(preset, SEQ[preset], tmp_path / "m")
    ours = gemma_core.load(tmp_path / "m", backend=backend, task="sequence-classification")
    assert ours.labels == tuple(LABELS)
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = ours.to_numpy(ours.forward(ids, mask).logits)
    assert got.shape == ref.shape == (2, 3)
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("preset", sorted(TOK))
def test_token_classification_matches_transformers(tmp_path, preset: str) -> None:  # type: ignore[no-untyped-def]
    hf = _hf(preset, TOK[preset], tmp_path / "m")
    ours = gemma_core.load(tmp_path / "m", task="token-classification")
    ids, mask = _batch()
    positions = np.where(mask.astype(bool), np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(positions)).logits.numpy()
    got = ours.forward(ids, mask).logits
    real = mask.astype(bool)
    assert got.shape == ref.shape == (2, ids.shape[1], 3)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4 * np.abs(ref).max())


def test_base_hidden_states_match_transformers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = _hf("tiny-gemma3", SEQ["tiny-gemma3"], tmp_path / "m")
    ours = gemma_core.load(tmp_path / "m", task="base")
    ids, mask = _batch()
    positions = np.where(mask.astype(bool), np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf.model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(positions), output_hidden_states=True)
    out = ours.forward(ids, mask)
    assert out.logits is None
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.num_layers + 1
    real = mask.astype(bool)
    for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
        want = want.numpy()
        np.testing.assert_allclose(got[real], want[real], atol=1e-4 * np.abs(want).max())
    np.testing.assert_array_equal(out.last_hidden_state, out.hidden_states[-1])


def test_pooling_is_the_same_for_left_and_right_padding() -> None:
    model = gemma_core.load("tiny-gemma", task="sequence-classification", num_labels=4)
    left = model.forward(np.array([[0, 0, 5, 6, 7]]), np.array([[0, 0, 1, 1, 1]])).logits
    alone = model.forward(np.array([[5, 6, 7]])).logits
    right = model.forward(np.array([[5, 6, 7, 0, 0]])).logits  # right padding: mask left out, as HF
    np.testing.assert_allclose(left, alone, atol=1e-5)
    np.testing.assert_allclose(right, alone, atol=1e-5)


def test_head_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="task: unknown value 'translation'"):
        gemma_core.load("tiny-gemma", task="translation")
    from gemma_core.checkpoint import save_checkpoint
    from gemma_core.weights import random_weights

    config = get_preset("tiny-gemma")
    save_checkpoint(tmp_path / "lm", config, random_weights(config, 0))
    with pytest.raises(WeightError, match=r"no score\.weight classification head"):
        gemma_core.load(tmp_path / "lm", task="sequence-classification")
    assert gemma_core.load(tmp_path / "lm", task="base").task == "base"  # an LM loads as a base model
    hf = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert "id2label" not in hf


def test_classify_cli(tmp_path, spm_file, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from gemma_core.cli import main

    _hf("tiny-gemma3", SEQ["tiny-gemma3"], tmp_path / "m")
    shutil.copy(spm_file, tmp_path / "m" / "tokenizer.model")
    assert main(["classify", "--model", str(tmp_path / "m"), "Hello world"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(LABELS)
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-3
