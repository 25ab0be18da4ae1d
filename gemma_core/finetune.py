"""LoRA fine-tuning on any trainable backend (`gemma finetune`): one loop, one data order, one
optimizer formula, so the same seed, data and settings give the same loss curve on torch, jax
and tensorflow.

The loop is backend-neutral: batches come from `gemma_core.data.Batches`, the adapter's fresh
weights from `gemma_core.lora.init_lora_weights` (numpy, the same numbers for every backend),
and a backend's `Trainer` (`backends.<name>.train`, over its trainable face) does the step:
the loss of each micro-batch, gradients with respect to the adapter only, and AdamW. Every
trainer runs the same AdamW, written out in `adamw_update` (torch.optim.AdamW's formula:
decoupled weight decay, bias-corrected moments, `eps` added to the corrected root). The learning
rate of each step is computed here once (`learning_rate`: transformers' `get_scheduler` types
constant, constant_with_warmup, linear and cosine, with `warmup_steps` or `warmup_ratio` as
transformers' Trainer counts them) and passed to the trainer, so every backend steps alike.

Gradient accumulation weighs each micro-batch by its counted tokens: the step's loss is the mean
over every token of the step's micro-batches, as one batch of them all would give.

Checkpoints (`DIR/checkpoint-STEP/`): the adapter in PEFT's format, `optimizer.safetensors` (the
moments of every adapter weight) and `trainer_state.json` (step, losses, the settings). A run
started again with `resume=True` continues from the newest checkpoint whose settings match and
computes exactly the steps an uninterrupted run would: the batches of step k are fixed by the
seed, and the schedule's position is the step count. The finished adapter is written to `DIR`
itself (`gemma generate --adapter DIR`), in one folder transaction.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gemma_core.data import IGNORE_INDEX, Batch, Batches, Example
from gemma_core.errors import CheckpointError, ConfigError, InputError
from gemma_core.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoraConfig,
    config_to_peft,
    init_lora_weights,
    write_peft_files,
)

TRAINABLE_BACKENDS = ("torch", "jax", "tensorflow")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")  # transformers' names
# the schedule's settings, and their values in checkpoints written before they existed
_SCHEDULE_DEFAULTS = {"lr_scheduler_type": "constant", "warmup_steps": 0, "warmup_ratio": 0.0}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The settings of a run (all of them saved with each checkpoint; a resume must match)."""

    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 1
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    pack: bool = True
    seed: int = 0
    max_steps: int | None = None
    save_every: int | None = None
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len: must be at least 2, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ConfigError(f"lr: must be positive and weight_decay non-negative, got {self.lr}, "
                              f"{self.weight_decay}")
        for name in ("max_steps", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be at least 1, got {value}")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler_type: {self.lr_scheduler_type!r} is not one of "
                              f"{', '.join(LR_SCHEDULERS)}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup: warmup_steps must be non-negative and warmup_ratio in [0, 1), "
                              f"got {self.warmup_steps}, {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("warmup: give warmup_steps or warmup_ratio, not both")
        if self.lr_scheduler_type == "constant" and (self.warmup_steps or self.warmup_ratio):
            # transformers' constant schedule ignores a warmup; a warmup asked for is not dropped
            raise ConfigError("warmup: the constant schedule has none; use constant_with_warmup")

    def as_json(self) -> dict[str, Any]:
        """The settings as JSON values (the adapter's as PEFT writes them)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lora"}
        out["betas"] = list(self.betas)
        out["lora"] = config_to_peft(self.lora)
        return out


class Trainer(Protocol):
    """What a backend's trainer provides (`backends.<name>.train.Trainer`)."""

    def step(self, micro: Sequence[Batch], lr: float) -> float:
        """One optimizer step over the micro-batches; returns the step's token-mean loss."""
        ...

    def loss(self, batch: Batch) -> tuple[float, int]:
        """(summed token loss, counted tokens) of `batch`, without a gradient."""
        ...

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The adapter's weights, float32 numpy."""
        ...

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """`{name + ".m"/".v": moments}` and `"step"`, float32/int64 numpy."""
        ...


def warmup_count(cfg: TrainConfig, total: int) -> int:
    """The warmup's steps in a run of `total` steps: `warmup_steps`, else `warmup_ratio` of
    `total` rounded up (transformers' `TrainingArguments.get_warmup_steps`)."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(total * cfg.warmup_ratio)


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of the `step`-th optimizer step (1-based) of a run of `total` steps:
    `cfg.lr` times the factor of transformers' schedule `cfg.lr_scheduler_type` after `step - 1`
    scheduler steps (its Trainer steps the scheduler after each optimizer step), the same
    formulas (`get_linear_schedule_with_warmup`, `get_cosine_schedule_with_warmup` with half a
    cycle, `get_constant_schedule[_with_warmup]`)."""
    kind, current = cfg.lr_scheduler_type, step - 1
    warmup = warmup_count(cfg, total) if kind != "constant" else 0
    if current < warmup:
        factor = float(current) / float(max(1, warmup))
    elif kind in ("constant", "constant_with_warmup"):
        factor = 1.0
    elif kind == "linear":
        factor = max(0.0, float(total - current) / float(max(1, total - warmup)))
    else:  # cosine, num_cycles 0.5: from 1 down to 0 over the steps after the warmup
        progress = float(current - warmup) / float(max(1, total - warmup))
        factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return cfg.lr * factor


def counted_tokens(labels: np.ndarray) -> int:
    """Tokens a batch's loss counts: labels after the shift that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def adamw_update(xp: Any, p: Any, g: Any, m: Any, v: Any, step: int, lr: float, cfg: TrainConfig,
                 ) -> tuple[Any, Any, Any]:
    """torch.optim.AdamW's update of one weight, in any array namespace (`xp` gives `sqrt`):
    returns (p', m', v') for the `step`-th update (1-based)."""
    b1, b2 = cfg.betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * (g * g)
    denom = xp.sqrt(v) / math.sqrt(1 - b2 ** step) + cfg.eps
    p = p * (1 - lr * cfg.weight_decay) - (lr / (1 - b1 ** step)) * m / denom
    return p, m, v


def saved_moments(state: Mapping[str, np.ndarray] | None, shapes: Mapping[str, tuple[int, ...]],
                  ) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(step count, first and second AdamW moments) of the weights of `shapes`, float32 numpy:
    from a checkpoint's `optimizer_state` (`moments_state` wrote it), or zeros for a new run."""
    state = state or {}
    count = int(np.asarray(state["step"]).reshape(-1)[0]) if "step" in state else 0
    moments = [{n: np.array(state.get(n + suffix, np.zeros(shape, np.float32)), np.float32)
                for n, shape in shapes.items()} for suffix in (".m", ".v")]
    return count, moments[0], moments[1]


def moments_state(count: int, m: Mapping[str, np.ndarray], v: Mapping[str, np.ndarray],
                  ) -> dict[str, np.ndarray]:
    """A trainer's `optimizer_state`: `{name + ".m"/".v": moments}` and `"step"`."""
    out = {"step": np.asarray([count], np.int64)}
    for n in m:
        out[n + ".m"], out[n + ".v"] = np.array(m[n], np.float32), np.array(v[n], np.float32)
    return out


def make_trainer(backend: str, model: Any, cfg: TrainConfig, lora_weights: Mapping[str, np.ndarray],
                 optimizer_state: Mapping[str, np.ndarray] | None = None) -> Trainer:
    """The trainer of `backend` over `model` (a `gemma_core.Model`, any backend's weights)."""
    if backend not in TRAINABLE_BACKENDS:
        raise ConfigError(f"backend: {backend!r} cannot train (trainable: {', '.join(TRAINABLE_BACKENDS)})")
    module = importlib.import_module(f"backends.{backend}.train")
    trainer: Trainer = module.Trainer(model, cfg, lora_weights, optimizer_state)
    return trainer


@dataclasses.dataclass
class RunResult:
    """What a run did: the loss of every step (resumed steps included), the eval loss at the end
    (None without eval data), tokens trained per second of this process, and the adapter folder."""

    losses: list[float]
    eval_loss: float | None
    tokens_per_second: float
    adapter: Path
    steps: int


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for child in out.glob("checkpoint-*") if out.is_dir() else ():
        tail = child.name.removeprefix("checkpoint-")
        if tail.isdigit() and (child / STATE_FILE).is_file():
            found.append((int(tail), child))
    return sorted(found)


def _save_checkpoint(out: Path, step: int, cfg: TrainConfig, trainer: Trainer, losses: list[float],
                     extra: Mapping[str, Any]) -> Path:
    from gemma_core.safetensors_io import write_safetensors
    from gemma_core.transaction import write_transaction

    folder = out / f"checkpoint-{step}"
    weights = trainer.lora_weights()
    with write_transaction(folder, overwrite=True) as tmp:
        tmp.mkdir()
        write_peft_files(tmp, cfg.lora, weights)
        write_safetensors(tmp / OPTIMIZER_FILE, trainer.optimizer_state())
        state = {"step": step, "losses": losses, "settings": cfg.as_json(), **extra}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    return folder


def _save_adapter(out: Path, cfg: TrainConfig, weights: Mapping[str, np.ndarray], config: Any,
                  state: Mapping[str, Any]) -> None:
    """The finished adapter as PEFT files in `out` itself (beside its checkpoints), with the run's
    state, in one folder transaction: a new `out` holding the three files and everything else `out`
    held (hard links, copies where the filesystem has none) takes the old one's place in one
    rename, so a crash leaves the old adapter or the new one, never new weights beside an old
    config."""
    from gemma_core.lora import check_lora_weights
    from gemma_core.transaction import write_transaction

    check_lora_weights(config, cfg.lora, weights)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file, not a folder for the adapter")
    target = out.resolve()  # a symlinked folder: its target is replaced, the link kept
    with write_transaction(target, overwrite=True) as tmp:
        tmp.mkdir()
        if target.is_dir():
            _carry(target, tmp, skip={WEIGHTS_FILE, CONFIG_FILE, STATE_FILE})
        write_peft_files(tmp, cfg.lora, weights)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def _carry(src: Path, dst: Path, skip: set[str]) -> None:
    """The entries of folder `src` but `skip` into the empty folder `dst`: files hard-linked
    (copied where links fail), folders recreated, symlinks as links."""
    import shutil

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # another filesystem, or one without hard links
            shutil.copy2(a, b)

    for child in sorted(src.iterdir()):
        if child.name in skip:
            continue
        if child.is_symlink():
            os.symlink(os.readlink(child), dst / child.name)
        elif child.is_dir():
            shutil.copytree(child, dst / child.name, symlinks=True, copy_function=link)
        else:
            link(str(child), str(dst / child.name))


def _resume_from(out: Path, cfg: TrainConfig, extra: Mapping[str, Any],
                 ) -> tuple[int, list[float], dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    from gemma_core.lora import load_peft
    from gemma_core.safetensors_io import read_safetensors

    found = _checkpoints(out)
    if not found:
        return None
    step, folder = found[-1]
    state = json.loads((folder / STATE_FILE).read_text())
    want = {"settings": cfg.as_json(), **extra}
    have = {k: state.get(k) for k in want}
    if isinstance(have["settings"], dict):  # a checkpoint from before the schedule's settings
        have["settings"] = {**_SCHEDULE_DEFAULTS, **have["settings"]}
    if json.loads(json.dumps(want)) != have:
        diff = [k for k in want["settings"] if want["settings"][k] != (have["settings"] or {}).get(k)]
        diff += [k for k in extra if extra[k] != state.get(k)]
        raise CheckpointError(f"{folder}: saved with other settings ({', '.join(diff) or 'settings'}); "
                              "resume with the same ones, or write to a new --out")
    _, weights = load_peft(folder)
    return step, list(state["losses"]), dict(weights), dict(read_safetensors(folder / OPTIMIZER_FILE))


def _progress(step: int, total: int, loss: float, tokens_per_second: float) -> None:
    end = "\r" if sys.stderr.isatty() and step < total else "\n"
    print(f"step {step}/{total}  loss {loss:.4f}  {tokens_per_second:,.0f} tok/s", end=end,
          file=sys.stderr, flush=True)


def finetune(model: Any, examples: Sequence[Example], out: str | os.PathLike[str], cfg: TrainConfig, *,
             backend: str = "torch", eval_examples: Sequence[Example] = (), resume: bool = False,
             progress: Callable[[int, int, float, float], None] | None = _progress,
             data_id: str = "", stop_after: int | None = None) -> RunResult:
    """Train a LoRA adapter of `cfg.lora` on `examples` over `model`'s frozen weights, on
    `backend`; write checkpoints under `out` and the adapter to `out`. `data_id` names the data
    (saved with checkpoints: a resume on other data is refused). `stop_after` ends the process's
    work after that many steps of the run (an interruption, for tests and time-boxed jobs)."""
    out = Path(out)
    pad = model.config.pad_token_id
    batches = Batches(examples, batch_size=cfg.batch_size, seq_len=cfg.seq_len, epochs=cfg.epochs,
                      pack=cfg.pack, seed=cfg.seed, pad_id=pad)
    total = len(batches) // cfg.grad_accum
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if total == 0:
        raise InputError(f"data: {len(batches)} batches make no step of {cfg.grad_accum} accumulated")
    extra = {"data": data_id, "backend": backend, "dtype": model.dtype}
    done, losses = 0, list[float]()
    lora_weights = init_lora_weights(model.config, cfg.lora, cfg.seed)
    optimizer: dict[str, np.ndarray] | None = None
    if resume:
        found = _resume_from(out, cfg, extra)
        if found is not None:
            done, losses, lora_weights, optimizer = found
    elif _checkpoints(out):
        raise CheckpointError(f"{out}: holds checkpoints of an earlier run; pass resume=True "
                              "(--resume) to continue it, or write to a new folder")
    trainer = make_trainer(backend, model, cfg, lora_weights, optimizer)
    stream = iter(batches.from_step(done * cfg.grad_accum))
    start, tokens = time.perf_counter(), 0
    last = done
    for step in range(done + 1, total + 1):
        if stop_after is not None and step - done > stop_after:
            break
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        losses.append(trainer.step(micro, learning_rate(cfg, step, total)))
        tokens += sum(b.tokens for b in micro)
        last = step
        rate = tokens / max(time.perf_counter() - start, 1e-9)
        if progress is not None:
            progress(step, total, losses[-1], rate)
        if cfg.save_every is not None and step % cfg.save_every == 0 and step < total:
            _save_checkpoint(out, step, cfg, trainer, losses, extra)
    eval_loss = evaluate(trainer, eval_examples, cfg, pad) if eval_examples else None
    if last == total:
        state = {"step": last, "losses": losses, "eval_loss": eval_loss, "settings": cfg.as_json(), **extra}
        _save_adapter(out, cfg, trainer.lora_weights(), model.config, state)
    else:
        _save_checkpoint(out, last, cfg, trainer, losses, extra)
    rate = tokens / max(time.perf_counter() - start, 1e-9)
    return RunResult(losses, eval_loss, rate, out, last)


def evaluate(trainer: Trainer, examples: Sequence[Example], cfg: TrainConfig, pad_id: int) -> float:
    """The token-mean loss over `examples` (padded, one pass, in order)."""
    batches = Batches(examples, batch_size=1, seq_len=cfg.seq_len, pack=False, seed=cfg.seed, pad_id=pad_id)
    total, count = 0.0, 0
    for batch in batches:
        s, n = trainer.loss(batch)
        total, count = total + s, count + n
    if count == 0:
        raise InputError("eval data: no token to evaluate")
    return total / count
