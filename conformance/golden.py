"""Golden expectations: float32 logits and cache slices that Hugging Face transformers produced
once on small random-weight models, committed under `conformance/golden/`, so conformance against
an independent implementation runs where transformers is not installed (float32 cells only; the
narrower dtypes are compared with the reference in the same dtype).

Regenerate with `python -m conformance.golden` (needs transformers); it reports how far the new
values moved from the committed ones.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gemma_core.cache import batch_ids
from gemma_core.config import GemmaConfig
from gemma_core.presets import get_preset
from gemma_core.weights import random_weights

GOLDEN_DIR = Path(__file__).parent / "golden"


@dataclasses.dataclass(frozen=True)
class GoldenCase:
    """A tiny model (preset + changes, weights from `seed`) on a left-padded batch."""

    name: str
    preset: str
    changes: dict[str, Any]
    lengths: tuple[int, ...] = (14, 9)
    seed: int = 11

    def config(self) -> GemmaConfig:
        return get_preset(self.preset).replace(**self.changes)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed + 1)
        return batch_ids([list(rng.integers(3, self.config().vocab_size, n)) for n in self.lengths])


GOLDEN_CASES = (
    GoldenCase("golden-gemma1", "tiny-gemma", {}),
    GoldenCase("golden-gemma2-softcaps", "tiny-gemma2",
               {"attn_logit_softcap": 0.5, "final_logit_softcap": 4.0}),
    GoldenCase("golden-gemma3", "tiny-gemma3", {}),
)


def load_golden(case: GoldenCase) -> dict[str, np.ndarray]:
    """The committed arrays of a case: logits [B,T,V], keys/values of the first and last layer."""
    with np.load(GOLDEN_DIR / f"{case.name}.npz") as data:
        return {k: data[k] for k in data.files}


def _transformers_values(case: GoldenCase) -> tuple[dict[str, np.ndarray], str]:
    import torch
    import transformers

    config = case.config()
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    weights = random_weights(config, case.seed)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.eval()
    ids, mask = case.inputs()
    positions = np.where(mask.astype(bool), np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True)
    layers = out.cache.layers
    values = {"logits": out.logits.float().numpy()}
    for tag, layer in (("first", layers[0]), ("last", layers[-1])):
        values[f"{tag}_keys"] = layer.keys.float().numpy()
        values[f"{tag}_values"] = layer.values.float().numpy()
    return values, transformers.__version__


def regenerate() -> int:
    """Recompute every golden file with transformers and report the change from the committed one."""
    GOLDEN_DIR.mkdir(exist_ok=True)
    meta = {}
    for case in GOLDEN_CASES:
        values, version = _transformers_values(case)
        path = GOLDEN_DIR / f"{case.name}.npz"
        if path.exists():
            old = load_golden(case)
            moved = {k: float(np.abs(old[k] - values[k]).max()) for k in values
                     if k in old and old[k].shape == values[k].shape}
            print(f"{case.name}: max change {moved}")
        else:
            print(f"{case.name}: new")
        np.savez_compressed(path, **values)  # type: ignore[arg-type]
        meta[case.name] = {"transformers": version, "preset": case.preset, "changes": case.changes,
                           "seed": case.seed, "lengths": list(case.lengths)}
    (GOLDEN_DIR / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(regenerate())
