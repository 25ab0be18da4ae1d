"""The torch trainer of `gemma_core.finetune`: the adapter on the torch face
(`backends.torch.module.as_module(model, lora=...)`), gradients by autograd, and the shared AdamW
(`gemma_core.finetune.adamw_update`) on the adapter's Parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from backends.torch.module import as_module
from gemma_core.data import Batch
from gemma_core.finetune import TrainConfig, adamw_update, counted_tokens, moments_state, saved_moments


class Trainer:
    """One adapter in training: its Parameters, their AdamW moments and the step count."""

    def __init__(self, model: Any, cfg: TrainConfig, lora_weights: Mapping[str, np.ndarray],
                 optimizer_state: Mapping[str, np.ndarray] | None = None) -> None:
        torch.manual_seed(cfg.seed)  # the adapter's dropout draws
        self.cfg = cfg
        self.module = as_module(model, lora=cfg.lora, lora_weights=lora_weights).train()
        self.params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.count, m, v = saved_moments(optimizer_state, shapes)
        self.m = {n: torch.from_numpy(x).to(self.params[n].device) for n, x in m.items()}
        self.v = {n: torch.from_numpy(x).to(self.params[n].device) for n, x in v.items()}

    def step(self, micro: Sequence[Batch], lr: float) -> float:
        """One AdamW step over the micro-batches' token-weighted mean loss."""
        total = sum(counted_tokens(b.labels) for b in micro)
        for p in self.params.values():
            p.grad = None
        value = 0.0
        for batch in micro:
            n = counted_tokens(batch.labels)
            if n == 0:
                continue
            out = self.module(torch.as_tensor(batch.ids), torch.as_tensor(batch.mask),
                              labels=torch.as_tensor(batch.labels))
            assert out.loss is not None
            (out.loss * (n / total)).backward()
            value += float(out.loss.detach()) * n / max(total, 1)
        self.count += 1
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    continue
                w, m, v = adamw_update(torch, p.float(), p.grad.float(), self.m[name], self.v[name],
                                       self.count, lr, self.cfg)
                p.copy_(w.to(p.dtype))
                self.m[name], self.v[name] = m, v
        return value

    def loss(self, batch: Batch) -> tuple[float, int]:
        """(summed token loss, counted tokens) of `batch`, without a gradient (eval mode)."""
        n = counted_tokens(batch.labels)
        if n == 0:
            return 0.0, 0
        self.module.eval()
        try:
            with torch.no_grad():
                out = self.module(torch.as_tensor(batch.ids), torch.as_tensor(batch.mask),
                                  labels=torch.as_tensor(batch.labels), use_cache=False)
        finally:
            self.module.train()
        assert out.loss is not None
        return float(out.loss) * n, n

    def lora_weights(self) -> dict[str, np.ndarray]:
        """The adapter's weights, float32 numpy."""
        return self.module.lora_weights()

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The AdamW moments of every adapter weight and the step count."""
        return moments_state(self.count, {n: x.cpu().numpy() for n, x in self.m.items()},
                             {n: x.cpu().numpy() for n, x in self.v.items()})
