"""LoRA fine-tuning (gemma_core.finetune): one loss curve on every trainable backend (over float
and quantised bases, under a warmup schedule), transformers' learning-rate schedules, an exact
resume after an interruption, an adapter that gemma_core and PEFT load, written in one
transaction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import gemma_core
from gemma_core.data import Example
from gemma_core.errors import CheckpointError, ConfigError
from gemma_core.finetune import LR_SCHEDULERS, RunResult, TrainConfig, finetune, learning_rate
from gemma_core.lora import LoraConfig

BACKENDS = [b for b in ("torch", "jax", "tensorflow") if b in gemma_core.installed_backends()]
CFG = TrainConfig(lora=LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                  lr=2e-2, batch_size=2, seq_len=16, grad_accum=2, save_every=2, max_steps=6, seed=3,
                  lr_scheduler_type="linear", warmup_ratio=0.25)  # 2 warmup steps (1.5 rounded up)


def _examples(n: int = 40, seed: int = 0) -> list[Example]:
    """Token runs with a pattern (each token the previous plus one): learnable in a few steps."""
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(6, 24, n):
        start = int(rng.integers(3, 40))
        ids = tuple(start + i for i in range(int(length)))
        out.append(Example(ids, (False, *(True,) * (len(ids) - 1))))
    return out


@pytest.fixture(scope="module")
def model() -> gemma_core.Model:
    return gemma_core.load("tiny-gemma3", seed=1)


@pytest.fixture(scope="module")
def runs(model: gemma_core.Model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    return {backend: finetune(model, _examples(), tmp_path_factory.mktemp(backend) / "run", CFG,
                              backend=backend, eval_examples=_examples(4, seed=9), progress=None)
            for backend in BACKENDS}


def test_every_backend_trains_the_same_loss_curve(runs: dict[str, RunResult]) -> None:
    curves = {b: r.losses for b, r in runs.items()}
    ref = curves[BACKENDS[0]]
    assert len(ref) == CFG.max_steps and ref[-1] < ref[0]
    for backend, curve in curves.items():  # float32: AdamW amplifies only rounding, ~1e-6 here
        np.testing.assert_allclose(curve, ref, rtol=1e-4, err_msg=backend)
    evals = [r.eval_loss for r in runs.values()]
    np.testing.assert_allclose(evals, evals[0], rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_run_equals_the_uninterrupted_one(model: gemma_core.Model, runs: dict[str, RunResult],
                                                    tmp_path: Path, backend: str) -> None:
    full = runs[backend]
    folder = tmp_path / "run"
    part = finetune(model, _examples(), folder, CFG, backend=backend, progress=None, stop_after=3)
    assert part.steps == 3 and (folder / "checkpoint-3").is_dir()
    assert not (folder / "adapter_model.safetensors").exists()  # not finished: no adapter yet
    with pytest.raises(CheckpointError, match="pass resume=True"):
        finetune(model, _examples(), folder, CFG, backend=backend, progress=None)
    rest = finetune(model, _examples(), folder, CFG, backend=backend, progress=None, resume=True,
                    eval_examples=_examples(4, seed=9))
    assert rest.losses == full.losses and rest.eval_loss == full.eval_loss
    other = dataclasses.replace(CFG, lr=1e-3)
    with pytest.raises(CheckpointError, match=r"other settings \(lr\)"):
        finetune(model, _examples(), folder, other, backend=backend, progress=None, resume=True)
    other = dataclasses.replace(CFG, lr_scheduler_type="cosine")  # the schedule is a setting too
    with pytest.raises(CheckpointError, match=r"other settings \(lr_scheduler_type\)"):
        finetune(model, _examples(), folder, other, backend=backend, progress=None, resume=True)


def test_the_adapter_loads_in_gemma_core_and_peft(model: gemma_core.Model,
                                                  runs: dict[str, RunResult]) -> None:
    result = runs[BACKENDS[0]]
    adapter = result.adapter
    state = json.loads((adapter / "trainer_state.json").read_text())
    assert state["step"] == CFG.max_steps and state["losses"] == result.losses
    tuned = gemma_core.load("tiny-gemma3", seed=1, adapter=adapter)
    ids = np.array([[5, 6, 7, 8, 9, 10, 11]])
    ours = tuned.forward(ids).logits
    assert np.abs(ours - model.forward(ids).logits).max() > 1e-3  # the adapter changed the model
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    from hf_reference import hf_model

    hf = peft.PeftModel.from_pretrained(hf_model(model.config, seed=1), str(adapter)).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.float().numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_cli_finetune_then_generate_with_the_adapter(tiny_model_folder: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from gemma_core.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"the cat {i}"},
                                                       {"role": "assistant", "content": "a dog sat"}]})
                              for i in range(12)) + "\n")
    out = tmp_path / "adapter"
    args = ["finetune", "--model", str(tiny_model_folder), "--data", str(data), "--out", str(out),
            "--max-steps", "3", "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2",
            "--lora-rank", "2", "--target-modules", "all-linear", "--save-every", "2",
            "--lr-scheduler", "cosine", "--warmup-steps", "1"]
    assert main(args) == 0
    assert f"{out}: LoRA adapter (r=2) after 3 steps" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    settings = json.loads((out / "trainer_state.json").read_text())["settings"]
    assert (settings["lr_scheduler_type"], settings["warmup_steps"]) == ("cosine", 1)
    assert main(args) == 2  # the folder holds a run: refused without --resume
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_folder), "--adapter", str(out),
                 "--max-new-tokens", "3", "the cat"]) == 0
    assert capsys.readouterr().out.strip()  # the continuation
    assert main(["finetune", "--data", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "--data: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("kind", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup", [{}, {"warmup_steps": 3}, {"warmup_ratio": 0.15}, {"warmup_steps": 12}])
def test_the_lr_schedule_is_transformers(kind: str, warmup: dict[str, float], tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if kind == "constant" and warmup:
        with pytest.raises(ConfigError, match="constant_with_warmup"):
            dataclasses.replace(CFG, lr_scheduler_type=kind, **{"warmup_ratio": 0.0, **warmup})
        return
    total = 10
    cfg = dataclasses.replace(CFG, lr=3e-4, lr_scheduler_type=kind, **{"warmup_ratio": 0.0, **warmup})
    # transformers' Trainer: its warmup count (a ratio given as a float warmup_steps in v5), the
    # scheduler stepped after each optimizer step
    given = warmup.get("warmup_steps", warmup.get("warmup_ratio", 0))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], warmup_steps=given)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = transformers.get_scheduler(kind, optimizer, num_warmup_steps=args.get_warmup_steps(total),
                                           num_training_steps=total)
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    ours = [learning_rate(cfg, step, total) for step in range(1, total + 1)]
    assert ours == theirs  # the same formulas: equal to the bit
    assert ours[0] == (0.0 if warmup and kind != "constant" else cfg.lr)


def test_schedule_settings_are_checked() -> None:
    for bad, match in [({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type"),
                       ({"warmup_steps": -1}, "warmup"), ({"warmup_ratio": 1.0}, "warmup"),
                       ({"warmup_steps": 2, "warmup_ratio": 0.25}, "not both")]:
        with pytest.raises(ConfigError, match=match):
            dataclasses.replace(CFG, **bad)


def test_qlora_trains_the_same_loss_curve_on_every_backend(tmp_path: Path) -> None:
    """LoRA over a frozen int4 base (int8 embedding): the quantised products of every backend,
    one curve, as the float one (`test_every_backend_trains_the_same_loss_curve`)."""
    base = gemma_core.load("tiny-gemma3", seed=1, quantize="int4", hidden_size=64)
    cfg = dataclasses.replace(CFG, max_steps=4, save_every=None)
    runs = {b: finetune(base, _examples(), tmp_path / b, cfg, backend=b, progress=None) for b in BACKENDS}
    ref = runs[BACKENDS[0]].losses
    assert len(ref) == 4 and ref[-1] < ref[0]
    for backend, result in runs.items():
        np.testing.assert_allclose(result.losses, ref, rtol=1e-4, err_msg=backend)
        tuned = gemma_core.load("tiny-gemma3", seed=1, quantize="int4", hidden_size=64,
                                adapter=result.adapter)
        ids = np.array([[5, 6, 7, 8, 9, 10, 11]])
        assert np.abs(tuned.forward(ids).logits - base.forward(ids).logits).max() > 1e-3, backend
    if "jax" in BACKENDS:  # the jax face of a quantised base has nothing float to train alone
        from backends.jax.function import as_function

        with pytest.raises(ConfigError, match="without an adapter"):
            as_function(base)


def test_the_adapter_is_written_in_one_transaction(model: gemma_core.Model, runs: dict[str, RunResult],
                                                   tmp_path: Path) -> None:
    """A failure while the finished adapter is written leaves the old adapter whole; a success
    replaces its three files together and keeps the checkpoints beside them."""
    import shutil

    from gemma_core.finetune import _save_adapter
    from gemma_core.lora import load_peft

    out = tmp_path / "run"
    shutil.copytree(runs[BACKENDS[0]].adapter, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert any(p.parts[0] == "checkpoint-2" for p in before)
    weights = {n: w + 1 for n, w in load_peft(out)[1].items()}
    with pytest.raises(TypeError):  # the run's state cannot be written: after the new weights
        _save_adapter(out, CFG, weights, model.config, {"step": object()})
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    _save_adapter(out, CFG, weights, model.config, {"step": 7})
    _, saved = load_peft(out)
    assert all(np.array_equal(saved[n], w) for n, w in weights.items())
    assert json.loads((out / "trainer_state.json").read_text()) == {"step": 7}
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.parts[0].startswith("checkpoint-")} == \
        {k: v for k, v in before.items() if k.parts[0].startswith("checkpoint-")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no partial or old copy left
