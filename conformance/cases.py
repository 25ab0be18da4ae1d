"""The case catalogue: each numerics rule of DESIGN.md is exercised by a model case and/or an op case.

Model cases run prefill on a left-padded batch and then greedy decode steps, comparing logits
and exported cache states after every step; fork cases continue one prefix cache several ways.
Op cases run one op kind on crafted inputs (a binding softcap, a window shorter than the keys,
positions near 32k, a ring buffer that wraps).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from gemma_core import masks
from gemma_core.backend import Backend
from gemma_core.layout import EMBED
from gemma_core.quant import SCALE_SUFFIX, QuantConfig, quantize

# One step of a fork: an int feeds a chunk of that many random tokens (1: a decode step); a
# tagged tuple applies a cache operation of the contract (gemma_core/cache.py):
#   ("crop", n)          Model.crop_cache(cache, n): keep the first n slots (n < 0: drop the last -n)
#   ("crop-refused", n)  the same crop must raise InputError (a sliding ring has wrapped)
#   ("donate", t)        a chunk of t fed to Model.copy_cache(cache) with donate_cache=True: the
#                        copy is spent, the cache it was copied from usable and unchanged
#   ("reorder", rows)    cache.reorder_cache (beam search's gather): row i becomes row rows[i]
#   ("splice", row)      cache.write_row: the rows spliced into rows row, row + 1, ... of a cache of
#                        two more rows, whose other rows hold other prompts (the fork's own, gathered
#                        to other rows) fed other tokens
#   ("shift", n)         cache.shift_slots: every token n slots earlier (n < 0: later)
ForkStep = int | tuple[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A model-level comparison: prefill rows of `lengths` real tokens (left-padded), then decode.

    With `forks`, the prefill's cache is instead continued once per fork from the same cache
    object, each fork a run of steps (`ForkStep`), and compared with the reference's full
    forward over the prefix and the tokens that fork kept (`decode_steps` unused). `dynamic`:
    the prefix cache is `forward(ids, mask)`'s own, which grows as the forks feed it;
    `prefix_slot`: the prefix is prefilled from that slot of its cache (the serving engine's
    placement of a joining prompt), where its reference starts at slot 0.
    """

    name: str
    rules: tuple[str, ...]
    preset: str
    lengths: tuple[int, ...]
    decode_steps: int
    changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    task: str = "causal-lm"  # heads run prefill only (decode_steps 0)
    forks: tuple[tuple[ForkStep, ...], ...] = ()
    dtypes: tuple[str, ...] = ()  # the compute dtypes it runs in (empty: every one)
    dynamic: bool = False
    prefix_slot: int = 0


MODEL_CASES: tuple[ModelCase, ...] = (
    ModelCase("gemma1-mqa-padded", ("1 embedding scale", "2 rmsnorm", "3 rope", "4 attention MQA",
                                    "6 gelu_tanh mlp", "8 tied lm_head"),
              "tiny-gemma", lengths=(12, 7), decode_steps=4),
    ModelCase("gemma1-mha", ("4 query head h reads kv head h // (N/K)",), "tiny-gemma",
              lengths=(9,), decode_steps=2, changes={"num_kv_heads": 4}),
    ModelCase("gemma2-binding-softcaps", ("4 softcap before the mask", "8 final softcap",
                                          "7 four norms"),
              "tiny-gemma2", lengths=(10, 6), decode_steps=3,
              # binding but not saturating: a cap of 1 flattens logits (std ~2) into near-ties
              changes={"attn_logit_softcap": 0.5, "final_logit_softcap": 4.0}),
    ModelCase("gemma2-window-shorter-than-sequence", ("5 sliding window W keys incl. itself",
                                                      "4 query_pre_attn_scalar != head_dim"),
              "tiny-gemma2", lengths=(20, 13), decode_steps=12),
    ModelCase("gemma3-local-global-rope", ("3 per-layer rope theta and linear scaling",
                                           "7 qk-norm", "5 five local then one global"),
              "tiny-gemma3", lengths=(18, 11), decode_steps=6),
    ModelCase("gemma3-decode-past-ring", ("cache: sliding ring buffer wraps during decode",),
              "tiny-gemma3", lengths=(3,), decode_steps=19),
    ModelCase("fork-prefix-cache", ("cache: forward(cache=c) leaves c unchanged; two continuations "
                                    "of one prefix, rings wrapping",),
              "tiny-gemma3", lengths=(7, 4), decode_steps=0, changes={"sliding_window": 4},
              forks=((1, 1, 1, 1, 1), (3, 1)),
              dtypes=("float32",)),  # what it checks (the cache passed stays as it was) has no dtype
    # the cache operations, each against the reference's full forward over the tokens kept; few
    # positions are compared, so each seed is one whose compared argmaxes are no near-ties (bf16's
    # top-1 bound counts every flip), and chunks of 1 keep the compiled step shapes few
    ModelCase("cache-dynamic-grows", ("cache: forward(ids, mask) makes a dynamic cache that grows "
                                      "(grown_length) as a fork feeds it: a ring grown to its window, "
                                      "then kept",),
              "tiny-gemma3", lengths=(5, 3), decode_steps=0, changes={"sliding_window": 6},
              dynamic=True, forks=((1, 1, 1, 1), (1, 1)), seed=4),
    ModelCase("cache-crop-donate-reorder",
              ("cache: crop_cache(n) keeps the first n tokens (n < 0: drops the last -n), into the "
               "prefix too, then feeds others",
               "cache: a crop is refused (InputError) once a sliding ring wrapped",
               "cache: copy_cache is a fork of its own: forward(copy, donate_cache=True) spends the "
               "copy, the original's buffers stay as they were",
               "cache: reorder_cache gathers rows (beam search): rows repeated, the batch grown and "
               "shrunk"),
              "tiny-gemma3", lengths=(4, 2), decode_steps=0, seed=44,
              forks=((1, ("donate", 1), 1, ("crop", -2), 1, ("crop", 5), ("donate", 1), 1),
                     (("crop", -1), 1), (1, 1, 1, 1, 1, ("crop-refused", -1), 1), (("donate", 1),),
                     (1, ("reorder", (1, 1, 0)), 1, ("reorder", (2, 0)), 1),
                     (("reorder", (1, 0, 1)), ("donate", 1)))),
    ModelCase("cache-splice-shift", ("cache: write_row splices a prompt prefilled at an offset into "
                                     "rows of a larger cache; shift_slots moves the batch earlier "
                                     "and later, rings wrapped; the same logits and exported cache "
                                     "as the prompt alone",),
              "tiny-gemma3", lengths=(5, 2), decode_steps=0, changes={"sliding_window": 4},
              prefix_slot=3, seed=8, forks=((("splice", 1), 1, ("shift", 2), 1, ("shift", -3), 1),
                                            (("shift", -2), ("splice", 2), 1, ("shift", 4), 1))),
    ModelCase("gemma2-int8", ("quant: int8 per-channel projections and tied embedding",),
              "tiny-gemma2", lengths=(10, 6), decode_steps=3, changes={"quantization": QuantConfig("int8")}),
    ModelCase("gemma2-int4-int8-embedding", ("quant: int4 projections, int8 tied embedding (the "
                                             "int4 default)",),
              "tiny-gemma2", lengths=(7, 4), decode_steps=2, changes={"quantization": QuantConfig("int4")}),
    ModelCase("gemma2-int4-mixed-modules", ("quant: per-module schemes (v_proj int8, down_proj "
                                            "float), projections fused only within a scheme",),
              "tiny-gemma2", lengths=(8, 5), decode_steps=2, seed=4,
              changes={"quantization": QuantConfig("int4", modules={"v_proj": "int8",
                                                                     "down_proj": "float"})}),
    ModelCase("gemma1-int4-untied", ("quant: int4 groups of 32, an untied lm_head in int4 too",),
              "tiny-gemma", lengths=(9, 5), decode_steps=3, seed=2,
              changes={"quantization": QuantConfig("int4", 32, embedding="int4"),
                       "tie_word_embeddings": False}),
    ModelCase("gemma3-nf4-float-embedding", ("quant: nf4 projections, embedding kept in float",),
              "tiny-gemma3", lengths=(8,), decode_steps=3,
              changes={"quantization": QuantConfig("nf4", 32, embedding="float"), "hidden_size": 64}),
    ModelCase("gemma2-sequence-classification", ("head: score on every position, pooled at the "
                                                 "rightmost non-pad token",),
              "tiny-gemma2", lengths=(12, 5), decode_steps=0, task="sequence-classification"),
    ModelCase("gemma1-token-classification", ("head: score with bias on every position",),
              "tiny-gemma", lengths=(9, 4), decode_steps=0, task="token-classification"),
    ModelCase("gemma3-base-hidden-states", ("head: final norm, every layer's hidden states",),
              "tiny-gemma3", lengths=(10, 7), decode_steps=0, task="base"),
)


class Harness:
    """Moves case inputs onto one backend in one dtype and back."""

    def __init__(self, backend: Backend, dtype: str, device: str | None = None) -> None:
        self.backend, self.dtype, self.device = backend, dtype, device
        self.table = backend.op_table(dtype)

    def f(self, x: np.ndarray) -> Any:
        """A float array in the compute dtype."""
        return self.backend.prepare_weights({"x": x}, self.dtype, self.device)["x"]

    def q(self, w: np.ndarray, quant: QuantConfig, name: str) -> tuple[Any, Any]:
        """A float `[O, I]` weight `name` quantised as `quant` says, as the backend's (values,
        scale) pair."""
        scheme = quant.scheme_for(name)
        assert scheme is not None, name
        values, scale = quantize(w, scheme, quant.group_for(scheme), name)
        pair = self.backend.prepare_weights({name: values, name + SCALE_SUFFIX: scale}, self.dtype,
                                            self.device, quant=quant)
        return pair[name], pair[name + SCALE_SUFFIX]

    def i(self, x: np.ndarray) -> Any:
        """An integer or boolean array."""
        return self.backend.asarray(x, self.device)

    def np(self, x: Any) -> np.ndarray:
        return np.asarray(self.backend.to_numpy(x), np.float64)


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op kind on crafted inputs; `run` returns named numpy outputs to compare."""

    name: str
    kind: str
    rules: tuple[str, ...]
    run: Callable[[Harness, np.random.Generator], dict[str, np.ndarray]]


def _normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape) * scale


def _embed(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    table = _normal(rng, 40, 3072, scale=0.05)  # D=3072: sqrt rounds to 55.5 in bf16
    ids = rng.integers(0, 40, (2, 5))
    return {"x": h.np(h.table["embed"](h.i(ids), h.f(table), scale=math.sqrt(3072)))}


def _rms_norm(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = _normal(rng, 2, 3, 64, scale=300.0)  # large activations, as Gemma 2/3 residuals are
    w = _normal(rng, 64, scale=3.0)
    return {"y": h.np(h.table["rms_norm"](h.f(x), h.f(w), eps=1e-6))}


def _linear(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x, w = _normal(rng, 2, 3, 48), _normal(rng, 40, 48, scale=0.2)
    return {"y": h.np(h.table["linear"](h.f(x), h.f(w)))}


def _heads(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = _normal(rng, 2, 3, 4 * 6)
    split = h.table["split_heads"](h.f(x), heads=4, head_dim=6)
    return {"split": h.np(split), "merged": h.np(h.table["merge_heads"](split))}


def _rope(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = _normal(rng, 2, 3, 4, 16)
    positions = np.array([[0, 1, 2, 3], [8191, 16_000, 28_000, 32_767]])
    out = {}
    for theta, scaling in ((1e4, 1.0), (1e6, 8.0)):
        cos, sin = h.table["rope_table"](h.i(positions), head_dim=16, theta=theta, scaling=scaling)
        tag = f"theta={theta:g},scaling={scaling:g}"
        out[f"{tag}:cos"], out[f"{tag}:sin"] = h.np(cos), h.np(sin)
        out[tag] = h.np(h.table["rope"](h.f(x), cos, sin))
    return out


def _kv_cache(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    # a sliding ring that wraps (chunks longer than it, decode, a chunk after decode), a global
    # layer, and a window longer than the cache (a ring that never wraps)
    for capacity, window in ((4, 4), (16, None), (12, 16)):
        layer = h.backend.new_cache_layer(2, 2, capacity, 8, h.dtype, h.device)
        start = 0
        for step, t in enumerate((6, 1, 3, 1, 1)):
            k, v = _normal(rng, 2, 2, t, 8), _normal(rng, 2, 2, t, 8)
            slots = np.arange(start, start + t)
            keys, values, layer = h.table["kv_cache"](h.f(k), h.f(v), layer, h.i(slots), window=window)
            # the layout every backend shares (gemma_core.masks); empty ring positions hold no value
            held = masks.key_slots(start, t, capacity, window) >= 0
            tag = f"capacity={capacity},window={window},step={step}"
            keys, values = h.np(keys), h.np(values)
            if keys.shape[2] != held.size:
                raise ValueError(f"kv_cache: {keys.shape[2]} keys for a layout of {held.size} ({tag})")
            out[f"{tag}:keys"], out[f"{tag}:values"] = keys[:, :, held], values[:, :, held]
            start += t
        kbuf, vbuf = h.backend.export_cache_layer(layer)
        tag = f"capacity={capacity},window={window}"
        out[f"{tag}:exported_keys"] = np.asarray(kbuf, np.float64)
        out[f"{tag}:exported_values"] = np.asarray(vbuf, np.float64)
    return out


def _bookkeeping() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Key slots in ring order (an empty position last), query slots 8..12 and the valid slots of
    two rows, the second left-padded up to slot 7."""
    key_slots = np.array([9, 10, 11, 12, 4, 5, 6, 7, -1])
    valid = np.ones((2, 13), bool)
    valid[1, :7] = False
    return key_slots, np.arange(8, 13), valid


def _attention_bias(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    key_slots, query_slots, valid = _bookkeeping()
    fmin = float(ml_dtypes.finfo(h.dtype).min)
    out = {}
    for window in (None, 3):
        bias = h.np(h.table["attention_bias"](h.i(masks.attention_mask(key_slots, query_slots, valid,
                                                                       window))))
        out[f"window={window}:visible"] = (bias == 0).astype(np.float64)
        out[f"window={window}:finite_minimum"] = (bias == fmin).astype(np.float64)
    return out


def _attention(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    # scores of a few units: large enough for a 0.5 softcap to bind, small enough that rounding
    # them to bf16 (eager) or not (fused kernels) stays within a few ulps of the output
    q = _normal(rng, 2, 4, 5, 8)
    keys, values = _normal(rng, 2, 2, 9, 8), _normal(rng, 2, 2, 9, 8)
    key_slots, query_slots, valid = np.arange(4, 13), np.arange(8, 13), _bookkeeping()[2]
    out = {}
    for window, softcap in ((None, None), (3, None), (None, 0.5), (4, 0.5)):
        bias = h.table["attention_bias"](h.i(masks.attention_mask(key_slots, query_slots, valid, window)))
        y = h.table["attention"](h.f(q), h.f(keys), h.f(values), bias, scale=0.3, softcap=softcap)
        out[f"window={window},softcap={softcap}"] = h.np(y)
    return out


def _elementwise(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    a, b = _normal(rng, 2, 3, 16, scale=3.0), _normal(rng, 2, 3, 16, scale=3.0)
    t = h.table
    return {
        "gelu_tanh": h.np(t["gelu_tanh"](h.f(np.linspace(-8, 8, 97)))),
        "mul": h.np(t["mul"](h.f(a), h.f(b))),
        "add": h.np(t["add"](h.f(a), h.f(b))),
        "softcap": h.np(t["softcap"](h.f(a * 20), cap=30.0)),
        "gather_positions": h.np(t["gather_positions"](h.f(a), h.i(np.array([2])))),
        **{f"split:{i}": h.np(part) for i, part in enumerate(t["split"](h.f(a), sizes=(4, 5, 7)))},
    }


QUANT_SCHEMES = tuple(QuantConfig(scheme, group, embedding=scheme) for scheme, group in (
    ("int8", None), ("int4", 32), ("int4", 64), ("nf4", 32)))


def _quantized(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = _normal(rng, 2, 3, 128)
    ids = rng.integers(0, 48, (2, 5))
    out = {}
    for quant in QUANT_SCHEMES:
        tag = f"{quant.scheme}/{quant.group_size}"
        for rows in (48, 40):  # 48: torch's fused int4 kernel tiles 16 rows; 40: its fallback
            # the 48-row table is the (tied) embedding: read as rows and as the LM head
            name = EMBED if rows == 48 else "model.layers.0.mlp.up_proj.weight"
            values, scale = h.q(_normal(rng, rows, 128, scale=0.1), quant, name)
            out[f"{tag}:qlinear:{rows}"] = h.np(h.table["qlinear"](
                h.f(x), values, scale, scheme=quant.scheme, group_size=quant.group_size))
            if rows == 48:
                out[f"{tag}:qembed"] = h.np(h.table["qembed"](
                    h.i(ids), values, scale, scheme=quant.scheme, group_size=quant.group_size,
                    scale_by=math.sqrt(128)))
    return out


OP_CASES: tuple[OpCase, ...] = (
    OpCase("op-embed", "embed", ("1 scale rounded to the compute dtype",), _embed),
    OpCase("op-rms_norm", "rms_norm", ("2 float32 norm, (1 + w), one cast",), _rms_norm),
    OpCase("op-linear", "linear", ("x @ w^T, no bias",), _linear),
    OpCase("op-heads", "split_heads", ("[B,T,N*H] <-> [B,N,T,H]",), _heads),
    OpCase("op-rope", "rope", ("3 rotate-half, float32 angles, cos/sin in the compute dtype, "
                                "positions to 32k, linear scaling",), _rope),
    OpCase("op-kv_cache", "kv_cache", ("cache: post-RoPE keys, ring buffer of W slots, the shared "
                                       "key layout",), _kv_cache),
    OpCase("op-attention_bias", "attention_bias", ("4 finfo.min mask, once per layer kind",
                                                   "5 window of W keys incl. itself, left padding"),
           _attention_bias),
    OpCase("op-attention", "attention", ("4 scale, GQA, softcap before the bias",
                                         "5 window and padding through the bias"), _attention),
    OpCase("op-elementwise", "gelu_tanh", ("6 gelu tanh", "8 softcap", "mul/add/gather/split"),
           _elementwise),
    OpCase("op-quantized", "qlinear", ("quant: int8 per channel, int4 and nf4 groups, dequantised "
                                       "exactly; embedding rows",), _quantized),
)


def _lora(h: Harness, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = _normal(rng, 2, 3, 48)
    out = {}
    # alpha / r, exact in every dtype, and rsLoRA's alpha / sqrt(r), which bf16 cannot hold
    for r, scale in ((4, 2.0), (8, 16 / math.sqrt(8))):
        a, b = _normal(rng, r, 48, scale=0.2), _normal(rng, 40, r, scale=0.5)
        out[f"r={r}"] = h.np(h.table["lora"](h.f(x), h.f(a), h.f(b), scale=scale))
    return out


# LoRA adapters (gemma_core.lora): a backend not declaring the "lora" op group skips this case
OP_CASES = (*OP_CASES, OpCase("op-lora", "lora", ("lora: (x @ A^T) @ B^T * scale, the scale applied "
                                                  "in float32",), _lora))
