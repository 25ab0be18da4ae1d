"""The torch face (`backends.torch.as_module`): a trainable nn.Module over the bound op list,
checked against the NumPy reference (logits), transformers (loss, every parameter's gradient,
state dicts both ways) and itself (cache continuation, optimizers, bf16, autocast, compile)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gemma_core  # noqa: E402
from backends.torch import as_module  # noqa: E402
from gemma_core.cache import batch_ids  # noqa: E402
from gemma_core.errors import ConfigError, InputError  # noqa: E402
from gemma_core.presets import get_preset  # noqa: E402

PRESETS = ("tiny-gemma", "tiny-gemma2", "tiny-gemma3")
SEED = 5
LENGTHS = (13, 9, 4)  # longer and shorter than the tiny windows (8), left-padded


def _batch(vocab: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, labels): a left-padded batch; labels -100 at pads and at one real token."""
    rng = np.random.default_rng(7)
    ids, mask = batch_ids([list(rng.integers(3, vocab, n)) for n in LENGTHS])
    labels = np.where(mask == 1, ids, -100)
    labels[0, 5] = -100
    return ids, mask, labels


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.where(mask.astype(bool), np.cumsum(mask, axis=1) - 1, 0)


def _f(x) -> float:  # type: ignore[no-untyped-def]
    """A scalar tensor's value (detached: it may carry a graph)."""
    return float(x.detach())


def _t(x: np.ndarray):  # type: ignore[no-untyped-def]
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.fixture(scope="module", params=PRESETS)
def preset(request: pytest.FixtureRequest) -> str:
    return request.param


def test_logits_equal_numpy_reference(preset: str) -> None:
    ids, mask, _ = _batch()
    ref = gemma_core.load(preset, seed=SEED).forward(ids, mask).logits
    module = as_module(gemma_core.load(preset, backend="torch", seed=SEED))
    out = module(_t(ids), _t(mask))
    assert out.loss is None
    got = out.logits.detach().numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_weights_from_any_backend_are_canonical_and_copied(preset: str) -> None:
    """The torch backend runs stacked q/k/v and gate/up products: the module unstacks them, under
    the canonical names, and owns its memory (training it leaves the source model alone)."""
    source = gemma_core.load(preset, backend="torch", seed=SEED)
    module = as_module(source)
    ref = gemma_core.weights.random_weights(get_preset(preset), SEED)
    params = dict(module.named_parameters())
    assert set(params) == set(ref)
    for name, p in params.items():
        assert p.requires_grad and p.dtype == torch.float32
        np.testing.assert_array_equal(p.detach().numpy(), ref[name], err_msg=name)
    with torch.no_grad():
        params["model.norm.weight"].add_(1.0)
    ids, mask, _ = _batch()
    want = gemma_core.load(preset, seed=SEED).forward(ids, mask).logits
    np.testing.assert_allclose(source.to_numpy(source.forward(ids, mask).logits), want, rtol=1e-5, atol=1e-4)


def test_runs_the_bound_op_list(preset: str) -> None:
    """Every op of `build_graph(config)` runs once a forward pass, through the module's op
    table: the module is an adapter, not a second model."""
    from collections import Counter

    module = as_module(gemma_core.load(preset, seed=SEED))
    assert module.graph == gemma_core.build_graph(module.config)
    table = module.op_table("float32")
    calls: Counter[str] = Counter()

    def counted(kind: str, fn):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[kind] += 1
            return fn(*args, **kwargs)
        return run

    for kind, fn in list(table.items()):
        table[kind] = counted(kind, fn)  # type: ignore[index]
    ids, mask, _ = _batch()
    module(_t(ids), _t(mask))  # train mode: the step without a cache
    assert calls == Counter(op.kind for op in module.graph_without_cache)
    calls.clear()
    module.eval()(_t(ids), _t(mask))  # eval mode keeps a cache to continue
    assert calls == Counter(op.kind for op in module.graph)


@pytest.mark.transformers
def test_loss_and_gradients_equal_transformers(preset: str) -> None:
    pytest.importorskip("transformers")
    from hf_reference import hf_model

    ids, mask, labels = _batch()
    hf = hf_model(get_preset(preset), seed=SEED)
    module = as_module(gemma_core.load(preset, seed=SEED))
    # the loss, with the first real token's label kept (the forward agrees at pads too)
    want = hf(_t(ids), attention_mask=_t(mask), position_ids=_t(_positions(mask)), labels=_t(labels)).loss
    got = module(_t(ids), _t(mask), labels=_t(labels)).loss
    assert got.dtype == torch.float32
    assert abs(_f(got) - _f(want)) <= 1e-5 * _f(want)
    # every parameter's gradient, the first real token's label (read at a pad) included: the
    # pad row's uniform attention differentiated as transformers' eager softmax, its embedding
    # row frozen (padding_idx)
    hf(_t(ids), attention_mask=_t(mask), position_ids=_t(_positions(mask)), labels=_t(labels)).loss.backward()
    module(_t(ids), _t(mask), labels=_t(labels)).loss.backward()
    ref = dict(hf.named_parameters())
    params = dict(module.named_parameters())
    assert set(params) == set(ref)
    for name, p in params.items():
        g, h = p.grad, ref[name].grad
        assert g is not None and g.dtype == torch.float32, name
        assert float((g - h).abs().max()) <= 1e-5 * float(h.abs().max()), name


@pytest.mark.transformers
def test_unpadded_gradients_take_sdpa_and_equal_transformers(preset: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows without padding (packed training batches) have no fully masked query row, so the
    training step runs SDPA (where no softcap applies) and its gradients still equal
    transformers' eager ones; a left-padded batch keeps the eager softmax under autograd."""
    pytest.importorskip("transformers")
    import torch.nn.functional as F
    from hf_reference import hf_model

    calls = [0]
    sdpa = F.scaled_dot_product_attention

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    config = get_preset(preset)
    module = as_module(gemma_core.load(preset, seed=SEED)).train()
    padded_ids, padded_mask, padded_labels = _batch()
    module(_t(padded_ids), _t(padded_mask), labels=_t(padded_labels)).loss.backward()
    assert calls[0] == 0  # left padding: fully masked pad rows, the eager softmax
    module.zero_grad()
    ids = np.random.default_rng(3).integers(3, 512, (2, 13))
    mask = np.ones_like(ids)
    hf = hf_model(config, seed=SEED)
    hf(_t(ids), attention_mask=_t(mask), labels=_t(ids)).loss.backward()
    module(_t(ids), _t(mask), labels=_t(ids)).loss.backward()
    assert calls[0] == (0 if config.attn_logit_softcap is not None else config.num_layers)
    ref = dict(hf.named_parameters())
    for name, p in module.named_parameters():
        g, h = p.grad, ref[name].grad
        assert float((g - h).abs().max()) <= 1e-5 * float(h.abs().max()), name


@pytest.mark.transformers
@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_round_trips_with_transformers(tied: bool) -> None:
    pytest.importorskip("transformers")
    from hf_reference import hf_model

    config = get_preset("tiny-gemma3").replace(tie_word_embeddings=tied)
    ids, mask, _ = _batch()
    hf = hf_model(config, seed=SEED)
    module = as_module(gemma_core.Model(config, gemma_core.weights.random_weights(config, SEED + 1)))
    hf_state = hf.state_dict()
    assert ("lm_head.weight" in module.state_dict()) and set(module.state_dict()) == set(hf_state)
    # transformers -> module (strict), then the same logits
    module.load_state_dict(hf_state)
    for name, p in module.named_parameters():
        assert torch.equal(p, hf_state[name]), name
    real = _t(mask.astype(bool))
    with torch.no_grad():
        want = hf(_t(ids), attention_mask=_t(mask), position_ids=_t(_positions(mask))).logits
        got = module(_t(ids), _t(mask)).logits
    assert float((got - want)[real].abs().max()) <= 1e-5 * float(want.abs().max())
    # module -> transformers (strict)
    other = hf_model(config, seed=SEED + 2)
    other.load_state_dict(module.state_dict())
    for name, p in other.state_dict().items():
        assert torch.equal(p, hf_state[name]), name
    if tied:  # a tied state dict may also leave the head out, as safetensors files do
        module.load_state_dict({k: v for k, v in hf_state.items() if k != "lm_head.weight"})
        with pytest.raises(RuntimeError, match=r"lm_head\.weight"):
            module.load_state_dict({**hf_state, "lm_head.weight": hf_state["lm_head.weight"][:-1]})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_steps_lower_the_loss(optimizer: str) -> None:
    ids, mask, labels = _batch()
    module = as_module(gemma_core.load("tiny-gemma3", seed=SEED)).train()
    opt = (torch.optim.SGD(module.parameters(), lr=0.1) if optimizer == "sgd"
           else torch.optim.AdamW(module.parameters(), lr=3e-3))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = module(_t(ids), _t(mask), labels=_t(labels)).loss
        loss.backward()
        opt.step()
        losses.append(_f(loss))
    with torch.no_grad():
        final = float(module(_t(ids), _t(mask), labels=_t(labels)).loss)
    assert all(np.isfinite(losses)) and final < losses[0] - 0.5, losses


def test_past_key_values_continue_the_full_forward(preset: str) -> None:
    ids, mask, _ = _batch()
    module = as_module(gemma_core.load(preset, seed=SEED)).eval()
    real = _t(mask.astype(bool))  # a pad's fully masked attention row averages whatever keys it has
    with torch.no_grad():
        full = module(_t(ids), _t(mask)).logits
        # a prefix, then a chunk (the cache grows from the prefix's 10 slots to 13)
        first = module(_t(ids[:, :10]), _t(mask[:, :10]))
        past = first.past_key_values
        before = [tuple(x.clone() for x in layer) for layer in past.layers]
        rest = module(_t(ids[:, 10:]), _t(mask[:, 10:]), past_key_values=past)
        assert rest.past_key_values.length == 13 and rest.past_key_values.max_length == 13
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1)[real], full[real],
                                   rtol=1e-5, atol=1e-5)
        # the past is a value: continuing it again gives the same, its buffers unchanged
        again = module(_t(ids[:, 10:]), _t(mask[:, 10:]), past_key_values=past)
        torch.testing.assert_close(again.logits, rest.logits, rtol=0, atol=0)
        for layer, old in zip(past.layers, before, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(layer, old, strict=True))
        # token by token from a preallocated cache
        out = module(_t(ids[:, :6]), _t(mask[:, :6]), max_length=13)
        steps = [out.logits]
        for i in range(6, 13):
            out = module(_t(ids[:, i:i + 1]), _t(mask[:, i:i + 1]), past_key_values=out.past_key_values)
            steps.append(out.logits)
        assert out.past_key_values.max_length == 13
        torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_bfloat16(preset: str) -> None:
    ids, mask, labels = _batch()
    module = as_module(gemma_core.load(preset, seed=SEED))
    with torch.no_grad():
        ref = module(_t(ids), _t(mask), labels=_t(labels))
    module.to(torch.bfloat16)
    out = module(_t(ids), _t(mask), labels=_t(labels))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    real = _t(mask.astype(bool))
    agree = (out.logits.argmax(-1) == ref.logits.argmax(-1))[real].float().mean()
    assert float(agree) >= 0.9 and abs(_f(out.loss) - _f(ref.loss)) < 0.05 * _f(ref.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and bool(p.grad.isfinite().all())
               for p in module.parameters())
    # a bfloat16 model converts to a bfloat16 module
    assert as_module(gemma_core.load(preset, backend="torch", dtype="bfloat16")).get_parameter(
        "model.norm.weight").dtype == torch.bfloat16


def test_autocast() -> None:
    ids, mask, labels = _batch()
    module = as_module(gemma_core.load("tiny-gemma3", seed=SEED))
    with torch.no_grad():
        ref = float(module(_t(ids), _t(mask), labels=_t(labels)).loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(_t(ids), _t(mask), labels=_t(labels))
    assert out.logits.dtype == torch.bfloat16
    assert abs(_f(out.loss) - ref) < 0.05 * ref
    out.loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 and bool(p.grad.isfinite().all())
               for p in module.parameters())


@pytest.mark.slow
def test_torch_compile_forward_and_backward() -> None:
    ids, mask, labels = _batch()
    module = as_module(gemma_core.load("tiny-gemma", seed=SEED))
    module(_t(ids), _t(mask), labels=_t(labels)).loss.backward()
    eager = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad()
    compiled = torch.compile(module)
    loss = compiled(_t(ids), _t(mask), labels=_t(labels)).loss
    loss.backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_qlora_over_quantised_weights_equals_the_reference(scheme: str) -> None:
    from gemma_core.lora import LoraConfig, init_lora_weights
    from gemma_core.quant import QuantConfig

    quant = QuantConfig(scheme, None if scheme == "int8" else 32)  # int4/nf4: an int8 tied embedding
    base = gemma_core.load("tiny-gemma3", seed=SEED, quantize=quant, hidden_size=64)
    lora = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    rng = np.random.default_rng(3)
    weights = {k: v if "lora_A" in k else rng.standard_normal(v.shape).astype(np.float32) * 0.1
               for k, v in init_lora_weights(base.config, lora, 2).items()}
    ref = gemma_core.Model(base.config, base.weights, lora=lora, lora_weights=weights)
    module = as_module(base, lora=lora, lora_weights=weights).eval()
    ids = np.array([[2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    want = ref.forward(ids).logits
    got = module(_t(ids)).logits.detach().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    scales = {n: module.get_buffer(n + "_scale").clone() for n in module.quantized}
    module.to(torch.bfloat16)  # the scales stay exact float32 (bit-cast), the values integers
    assert all(torch.equal(module.get_buffer(n + "_scale"), v) for n, v in scales.items())
    assert module(_t(ids)).logits.dtype == torch.bfloat16
    module.float().train()
    module(_t(ids), labels=_t(ids)).loss.backward()
    trained = {n for n, p in module.named_parameters() if p.grad is not None}
    assert trained == {n for n in weights} == {n for n, p in module.named_parameters() if p.requires_grad}


def test_refusals() -> None:
    with pytest.raises(ConfigError, match="quantis"):  # a quantised base in gemma-core's layout
        as_module(gemma_core.load("tiny-gemma", quantize="int8", backend="torch"))
    module = as_module(gemma_core.load("tiny-gemma3", seed=SEED))
    with pytest.raises(InputError, match="outside the vocabulary"):
        module(torch.tensor([[1, 512]]))
    with pytest.raises(InputError, match="attention_mask"):
        module(torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ConfigError, match="float16"):  # numerics rule 9, as every backend
        module.half()(torch.tensor([[1, 2]]))
