"""The peers load our outputs: keras-hub's backbone on our `keras-hub` export and transformers on
our `hf` export give the NumPy reference's logits (float32, max|diff| <= 1e-4 * std(ref))."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before keras is first imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.checkpoint import save_checkpoint
from gemma_core.formats.convert import convert
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

CONFIGS = {  # keras-hub expresses query_pre_attn_scalar only as head_dim or D/N
    "gemma1": get_preset("tiny-gemma"),
    "gemma2": get_preset("tiny-gemma2").replace(query_pre_attn_scalar=24),
    "gemma3": get_preset("tiny-gemma3"),
}
# 21 tokens: longer than the tiny presets' sliding window (8), so local layers are exercised
IDS = np.random.default_rng(5).integers(4, 512, size=(2, 21))
SCALE = 1e-4  # the conformance tolerance for float32: max|diff| <= 1e-4 * std(reference logits)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # tensorflow/keras import-time notices
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, spm_file: Path) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("peers")
    out = {}
    for name, config in CONFIGS.items():
        src = save_checkpoint(root / name / "src", config, random_weights(config, seed=7))
        (src / "tokenizer.model").write_bytes(spm_file.read_bytes())
        out[name] = {"src": src}
        for fmt in ("keras-hub", "hf"):
            convert(src, root / name / fmt, fmt)
            out[name][fmt] = root / name / fmt
    return out


def reference_logits(src: Path) -> np.ndarray:
    model = gemma_core.load(src, backend="numpy")
    return model.to_numpy(model.forward(IDS).logits).astype(np.float64)


@pytest.mark.parametrize("gen", list(CONFIGS))
def test_keras_hub_backbone_matches_reference(exports: dict[str, dict[str, Path]], gen: str) -> None:
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.Backbone.from_preset(str(exports[gen]["keras-hub"]))
    hidden = backbone({"token_ids": IDS.astype("int32"), "padding_mask": np.ones_like(IDS, dtype="int32")})
    got = np.asarray(backbone.token_embedding(hidden, reverse=True)).astype(np.float64)  # + final softcap
    want = reference_logits(exports[gen]["src"])
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= SCALE * want.std()


# keras-hub's SentencePieceTokenizer.set_proto opens vocabulary.spm without closing it
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(("gen", "task"), [("gemma1", "GemmaCausalLM"), ("gemma3", "Gemma3CausalLM")])
def test_keras_hub_causal_lm_loads_with_tokenizer(exports: dict[str, dict[str, Path]], gen: str,
                                                  task: str) -> None:
    keras_hub = pytest.importorskip("keras_hub")
    from gemma_core.tokenizer import GemmaTokenizer

    lm = getattr(keras_hub.models, task).from_preset(str(exports[gen]["keras-hub"]))
    ours = GemmaTokenizer(str(exports[gen]["src"] / "tokenizer.model"))
    text = "def f(x):\n    return x * 2"
    assert list(np.asarray(lm.preprocessor.tokenizer(text))) == ours.encode(text, add_special_tokens=False)
    del lm
    gc.collect()  # finalise the leaked file here, under this test's warning filter


@pytest.mark.transformers
@pytest.mark.parametrize("gen", list(CONFIGS))
def test_transformers_matches_reference_on_hf_export(exports: dict[str, dict[str, Path]], gen: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(exports[gen]["hf"], attn_implementation="eager")
    with torch.no_grad():
        got = model(torch.from_numpy(IDS)).logits.double().numpy()
    want = reference_logits(exports[gen]["src"])
    assert np.abs(got - want).max() <= SCALE * want.std()
