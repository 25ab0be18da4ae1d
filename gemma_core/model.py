"""The `Model`: the op list bound to one backend, dtype and weight set (`gemma_core.loading.load`
builds one from a checkpoint or preset)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gemma_core.backend import Backend, get_backend
from gemma_core.cache import (
    CacheState,
    KVCache,
    check_cache_fits,
    crop_length,
    grown_length,
    layer_capacity,
    ring_order,
)
from gemma_core.config import Architecture, GemmaConfig
from gemma_core.errors import ConfigError, InputError, WeightError
from gemma_core.graph import TASKS, Graph, Op, bind, build_graph, cache_name, fuse_projections, run_bound
from gemma_core.layout import FINAL_NORM, SCORE, iter_params, validate_weights
from gemma_core.masks import layer_kinds
from gemma_core.quant import SCALE_SUFFIX
from gemma_core.step import Bookkeeping, step_inputs
from gemma_core.weights import task_weights

DTYPES = ("float32", "bfloat16", "float16", "float64")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# Prompts longer than this are prefilled in chunks of it (llama.cpp's ubatch): a step's masks and
# attention scores are then [chunk, S], not [T, S], so a long prompt's memory grows as T·chunk
# where a window bounds the sliding layers (transformers' `prefill_chunk_size`; None: one step).
DEFAULT_PREFILL_CHUNK = 512


class Float16OverflowWarning(UserWarning):
    """Gemma 2/3 activations exceed float16's range; logits may be non-finite."""


def check_dtype(config: GemmaConfig, dtype: str, allow_float16: bool = False) -> None:
    """The float16 rule of the numerics contract, applied identically for every backend.

    Gemma 2/3 residual activations reach about 1e5, past float16's 65504, so float16 is refused
    for them unless `allow_float16` is set, which warns instead.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: unsupported value {dtype!r} (supported: {', '.join(DTYPES)})")
    if dtype == "float16" and config.architecture is not Architecture.GEMMA:
        message = (f"dtype: float16 overflows {config.architecture.value} activations (they exceed "
                   "65504); use bfloat16 or float32")
        if not allow_float16:
            raise ConfigError(message + ", or pass allow_float16=True to run it anyway")
        warnings.warn(message, Float16OverflowWarning, stacklevel=3)


@dataclasses.dataclass
class ForwardOutput:
    """Backend arrays and the updated cache. `logits`: causal-lm [B, T or 1, V],
    sequence-classification [B, labels], token-classification [B, T, labels]; None for base.
    `last_hidden_state` [B, T, D] (after the final norm) and `hidden_states` (the embeddings,
    then each layer's output, the last one normed: L + 1 arrays, as transformers) for base, and
    for the other tasks when `forward(..., output_hidden_states=True)` asks for them."""

    logits: Any
    cache: KVCache
    last_hidden_state: Any = None
    hidden_states: tuple[Any, ...] | None = None

    @property
    def past_key_values(self) -> KVCache:
        """`cache`, under the name transformers gives it."""
        return self.cache


class Model:
    """A Gemma causal LM realised by one backend. Build it with `gemma_core.load`."""

    def __init__(self, config: GemmaConfig, weights: Mapping[str, np.ndarray], *,
                 backend: str | Backend | None = None, dtype: str = "float32",
                 device: str | None = None, allow_float16: bool = False,
                 tokenizer: Any = None, compile: bool | None = None, task: str = "causal-lm",
                 labels: Sequence[str] | None = None, lora: Any = None,
                 lora_weights: Mapping[str, np.ndarray] | None = None) -> None:
        check_dtype(config, dtype, allow_float16)
        if task not in TASKS:
            raise ConfigError(f"task: unknown value {task!r} (known: {', '.join(TASKS)})")
        from_entry = getattr(weights, "entry_key", None)  # a load-cache entry's (prepared_cache)
        weights = task_weights(config, weights, task)
        score = weights.get(SCORE)
        num_labels = int(score.shape[0]) if score is not None and score.ndim == 2 else 0
        if task in ("sequence-classification", "token-classification") and num_labels == 0:
            raise WeightError(f"task {task}: the weights have no {SCORE} classification head")
        validate_weights(config, weights, task, num_labels)
        self.config, self.task = config, task
        self.labels = tuple(labels) if labels else tuple(f"LABEL_{i}" for i in range(num_labels))
        if len(self.labels) != num_labels:
            raise ConfigError(f"id2label: {len(self.labels)} labels for a head of {num_labels}")
        self.backend = backend if isinstance(backend, Backend) else get_backend(backend)
        if dtype not in self.backend.dtypes:
            raise ConfigError(f"dtype: backend {self.backend.name!r} does not support {dtype!r}")
        self.dtype = dtype
        self.device = device
        self.graph: Graph = build_graph(config, task)
        self.lora = lora  # a gemma_core.lora.LoraConfig: the adapter runs unmerged (LoRA, QLoRA)
        if lora is not None:
            from gemma_core.lora import apply_lora, check_lora_weights

            if "lora" not in self.backend.supported_groups():
                raise ConfigError(f"lora: backend {self.backend.name!r} does not declare the 'lora' op group")
            check_lora_weights(config, lora, lora_weights or {})
            self.graph = apply_lora(self.graph, config, lora)  # before fusion: fuses base weights only
            weights = {**weights, **(lora_weights or {})}
        elif lora_weights:
            raise ConfigError("lora_weights: given without the adapter's lora config")
        self.layer_kinds = layer_kinds(config)  # one attention mask per kind a step
        groups: dict[str, Sequence[str]] = {}
        if self.backend.fuse_projections:
            shapes = {name: shape for name, shape, _ in iter_params(config, task, num_labels)}
            self.graph, groups = fuse_projections(self.graph, shapes)
        from gemma_core import prepared_cache

        keyed = from_entry is not None and lora is None and task in ("causal-lm", "base")
        prepared = prepared_cache.entry_key(from_entry, self.backend, dtype, device, task) if keyed else None
        self.weights = _prepare(self.backend, config, weights, groups, dtype, device, task,
                                prepared if config.quantization is None else None)  # float only
        outputs = self.graph.outputs  # logits (or hidden and x0..x{L-1}), then the caches
        self.ops = self.backend.op_table(dtype)  # binds the graph to the ops and weights
        self.tokenizer = tokenizer

        def step(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
            # eager: the plan bound at init; traced (jit): bind the traced weights once per trace
            plan = self._plan if weights is self.weights else bind(self.graph, self.ops, weights)
            run_bound(plan, env)
            return {k: env[k] for k in outputs}

        options: dict[str, Any] = {"compile": compile, "device": device, "dtype": dtype}
        if prepared is not None:  # the weights and graph have an identity across processes: a
            # backend may keep a compiled step by it (torch's decode programs, backends/torch/aot)
            options["weights_key"] = json.dumps({"weights": prepared, "config": repr(config)})
            options["weights_name"] = prepared_cache.entry_name(prepared)  # stable across versions
            options["weights"] = self.weights  # the set the key names (not one put in its place)
            options["layer_windows"] = tuple(config.window(i) for i in range(config.num_layers))
            options["graph"], options["ops"] = self.graph, self.ops  # what the step runs
        self.raw_step = step  # the uncompiled step, for backends that trace it into larger loops
        self._step = self.backend.compile_step(step, options)
        self._step_options = options
        self._hidden_step: tuple[Any, Any] | None = None  # (op table, step): built when first asked
        self.static_shapes = self.backend.static_shapes(options)
        self.mutates_cache = self.backend.mutates_cache(options)  # forward copies a caller's cache
        self.prefill_chunk_size = DEFAULT_PREFILL_CHUNK

    @property
    def prefill_chunk_size(self) -> int | None:
        """Prompts longer than this many tokens are prefilled in steps of it (None: one step)."""
        return self._prefill_chunk

    @prefill_chunk_size.setter
    def prefill_chunk_size(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < 1):
            raise ConfigError(f"prefill_chunk_size: a positive integer or None (one step), got {value!r}")
        self._prefill_chunk = None if value is None else int(value)

    @property
    def ops(self) -> Mapping[str, Any]:
        """The op table the graph runs on; setting it (e.g. to patch an op) rebinds the graph."""
        return self._ops

    @ops.setter
    def ops(self, table: Mapping[str, Any]) -> None:
        self._ops = table
        self._plan = bind(self.graph, table, self.weights)
        if hasattr(self, "_step_options"):  # a patched table is not what a kept step was made of
            self._step_options.pop("weights_key", None)

    def new_cache(self, batch_size: int, max_length: int, *, dynamic: bool = False) -> KVCache:
        """An empty static cache for `batch_size` rows and up to `max_length` tokens. A step
        past `max_length` is refused, unless `dynamic` (what `forward` makes when given neither a
        cache nor a max_length): the cache then grows (`gemma_core.cache.grown_length`), as transformers'
        DynamicCache, at the price of a new shape (a recompile on compiled backends) per size."""
        if max_length > self.config.max_position_embeddings:
            raise InputError(f"max_length: {max_length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        c = self.config
        check_cache_fits(c, batch_size, max_length, self.dtype, self.device)
        layers = [
            self.backend.new_cache_layer(batch_size, c.num_kv_heads, layer_capacity(c, i, max_length),
                                         c.head_dim, self.dtype, self.device)
            for i in range(c.num_layers)
        ]
        return KVCache(layers=layers, length=0, max_length=max_length,
                       valid=np.zeros((batch_size, max_length), bool),
                       seen=np.zeros(batch_size, np.int64), dynamic=dynamic)

    def forward(self, input_ids: Any, attention_mask: Any = None, cache: KVCache | None = None,
                *, last_only: bool = False, max_length: int | None = None,
                donate_cache: bool = False, output_hidden_states: bool = False,
                past_key_values: KVCache | None = None) -> ForwardOutput:
        """Run `input_ids [B, T]` after whatever `cache` holds.

        `input_ids` and `attention_mask` may be numpy arrays, lists or any backend's tensors;
        the outputs are this backend's arrays. `attention_mask [B, T]` marks real tokens (1) and
        left padding (0); RoPE positions are the running count of real tokens, as transformers'
        generate computes them. Without a cache, one is made: a dynamic one of T slots, which
        later steps grow as they need (transformers' DynamicCache), or with `max_length` a static
        one of that size; a cache from `new_cache(batch, max_length)` is static too and refuses to
        overflow. `past_key_values` is `cache` under transformers' name. `last_only` computes
        logits for the last position only (decode). `output_hidden_states` also returns the
        residual stream (`ForwardOutput`), from a second step compiled when first asked.

        `cache` is left as it was (the step runs on a copy where the backend updates or donates
        buffers in place), so it can be continued again. `donate_cache=True` hands it over
        instead: no copy, and `cache` is spent (refused by every later use); decode loops that
        own their cache pass it to update it in place.

        With `last_only`, more than `prefill_chunk_size` tokens (an attribute, default
        `DEFAULT_PREFILL_CHUNK`; None turns it off) run as consecutive steps of that many: the
        same keys and logits (up to float rounding order), with memory bounded by the chunk.
        """
        if past_key_values is not None:
            if cache is not None:
                raise InputError("past_key_values: given with cache; they are one argument")
            cache = past_key_values
        ids = self._check_ids(input_ids)
        b, t = ids.shape
        mask = _check_mask(attention_mask, ids.shape, self.to_numpy)
        owned = cache is None or donate_cache
        if cache is None:
            cache = self.new_cache(b, max_length or t, dynamic=max_length is None)
        cache.check_usable()
        if cache.batch_size != b:
            raise InputError(f"input_ids: batch of {b} rows for a cache of {cache.batch_size}")
        given, start = cache, cache.length
        if start + t > cache.max_length:
            if not cache.dynamic:
                raise InputError(
                    f"input_ids: {start} cached + {t} new tokens exceed the cache's max_length "
                    f"{cache.max_length}; a cache sized by new_cache(batch, max_length) or "
                    "forward(..., max_length=) is static: make it larger, or use new_cache(..., "
                    "dynamic=True) or forward without max_length, whose cache grows")
            cache = self._grow_cache(cache, start + t, share=owned or not self.mutates_cache)
            owned = True  # the grown cache's layers are new or copied
        chunk = self.prefill_chunk_size
        if chunk is not None and t > chunk and last_only and self.task == "causal-lm" \
                and not output_hidden_states:
            if donate_cache and cache is not given:  # grown: `given` is spent before any step
                given.spent = True
            out = None
            for lo in range(0, t, chunk):  # each chunk continues the last one's cache, in place
                out = self.forward(ids[:, lo:lo + chunk], mask[:, lo:lo + chunk],
                                   cache if out is None else out.cache, last_only=True,
                                   donate_cache=owned or out is not None)
            assert out is not None  # (the first chunk's step spent a donated `given` itself)
            return out
        inputs, book = step_inputs(ids, mask, Bookkeeping(start, cache.valid, cache.seen),
                                   last_only=last_only, windows=self.layer_kinds)
        be, dev = self.backend, self.device
        # masks are [B,1,T,S], S fixed by the cache's max_length: a fixed shape for compiled steps
        env: dict[str, Any] = {name: be.asarray(value, dev) for name, value in inputs.items()}
        layers = cache.layers
        if not owned and self.mutates_cache:
            layers = [be.copy_cache_layer(layer) for layer in layers]
        env.update({cache_name(i): layer for i, layer in enumerate(layers)})
        if donate_cache:
            given.spent = True  # from here on its buffers may be overwritten or freed
        hidden = self.task == "base" or output_hidden_states
        step = self._step if self.task == "base" or not hidden else self._hidden_states_step()
        env = step(self.weights, env)
        new_cache = KVCache(
            layers=[env[cache_name(i)] for i in range(self.config.num_layers)],
            length=book.length, max_length=cache.max_length, valid=book.valid, seen=book.seen,
            dynamic=cache.dynamic,
        )
        logits = None if self.task == "base" else env["logits"]
        if not hidden:
            return ForwardOutput(logits=logits, cache=new_cache)
        stream = tuple(env[f"x{i}"] for i in range(self.config.num_layers))
        return ForwardOutput(logits=logits, cache=new_cache, last_hidden_state=env["hidden"],
                             hidden_states=(*stream, env["hidden"]))

    def __call__(self, input_ids: Any, attention_mask: Any = None, cache: KVCache | None = None,
                 **kwargs: Any) -> ForwardOutput:
        """`forward`, so `model(**tokenizer(texts, return_tensors=...))` runs as in transformers."""
        return self.forward(input_ids, attention_mask, cache, **kwargs)

    def _hidden_states_step(self) -> Any:
        """The step whose graph also outputs the residual stream `x0..x{L-1}` and `hidden`
        (the final norm over every position), compiled like the plain step on first use."""
        table = self._ops
        if self._hidden_step is None or self._hidden_step[0] is not table:
            graph = _with_hidden_states(self.graph, self.config)
            bound: list[Any] = [None, None]  # (weights, plan): bound once per weight set

            def step(weights: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
                if weights is not self.weights:  # traced (jit): bind the traced weights
                    plan = bind(graph, table, weights)
                else:  # eager: the model's weights, rebound if they were replaced (sharding)
                    if bound[0] is not weights:
                        bound[:] = [weights, bind(graph, table, weights)]
                    plan = bound[1]
                run_bound(plan, env)
                return {k: env[k] for k in graph.outputs}

            # (no kept step: its outputs are not the plain step's, and it is rarely used)
            self._hidden_step = (table, self.backend.compile_step(step, {**self._step_options,
                                                                         "weights_key": None}))
        return self._hidden_step[1]

    def _grow_cache(self, cache: KVCache, needed: int, share: bool) -> KVCache:
        """`cache` (dynamic) as a larger static cache holding its contents, for `needed` tokens.

        A layer whose capacity grows never wrapped (its old capacity was the old max_length,
        which the length never exceeds), so its slots are copied to the same slots of a new
        layer by the backend's own `kv_cache` op; a ring at its full window keeps its layer
        (`share`, else a `copy_cache_layer` copy: the step may write it in place)."""
        c, be, dev = self.config, self.backend, self.device
        size = grown_length(cache.max_length, needed, c.max_position_embeddings)
        check_cache_fits(c, cache.batch_size, size, self.dtype, dev)
        write = self._ops["kv_cache"]
        layers = []
        for i, state in enumerate(cache.layers):
            old, new = layer_capacity(c, i, cache.max_length), layer_capacity(c, i, size)
            if new == old:
                layers.append(state if share else be.copy_cache_layer(state))
                continue
            keys, values = self._cache_arrays(state)
            fresh = be.new_cache_layer(cache.batch_size, c.num_kv_heads, new, c.head_dim, self.dtype, dev)
            # window=None: a plain write at slots 0..old-1 (no wrap: old < new)
            layers.append(write(keys, values, fresh, be.asarray(np.arange(old), dev), window=None)[2])
        valid = np.zeros((cache.batch_size, size), bool)
        valid[:, :cache.max_length] = cache.valid
        return KVCache(layers=layers, length=cache.length, max_length=size, valid=valid,
                       seen=cache.seen.copy(), dynamic=True)

    def _cache_arrays(self, state: Any) -> tuple[Any, Any]:
        """A layer's (keys, values) slot buffers as backend arrays: the built-in `(keys, values)`
        pair as it is; another state through numpy (`export_cache_layer`, then `convert_weight`,
        or `asarray` for float64, which `convert_weight` would round through float32)."""
        if isinstance(state, tuple) and len(state) == 2:
            return state
        k, v = self.backend.export_cache_layer(state)
        if self.dtype == "float64":
            return self.backend.asarray(k, self.device), self.backend.asarray(v, self.device)
        return (self.backend.convert_weight(k, self.dtype, self.device),
                self.backend.convert_weight(v, self.dtype, self.device))

    def crop_cache(self, cache: KVCache, n: int, *, donate_cache: bool = False) -> KVCache:
        """`cache` without its tokens after the first `n` (`n < 0`: without its last `-n`), as
        transformers' `DynamicCache.crop`; static or dynamic as `cache` was. Global layers always
        allow it; a sliding ring only while it has not wrapped (else `InputError`: the tokens its
        window needs were overwritten). `cache` is left as it was (its layers copied where the
        step writes in place) unless `donate_cache=True` hands them over."""
        cache.check_usable()
        keep = crop_length(self.config, cache, n)
        if keep == cache.length:
            return cache
        valid = cache.valid.copy()
        valid[:, keep:] = False  # slots past `keep` are masked out and overwritten when fed again
        layers = cache.layers
        if donate_cache:
            cache.spent = True
        elif self.mutates_cache:
            layers = [self.backend.copy_cache_layer(layer) for layer in layers]
        return KVCache(layers=list(layers), length=keep, max_length=cache.max_length, valid=valid,
                       seen=valid[:, :keep].sum(axis=1).astype(np.int64), dynamic=cache.dynamic)

    def generate(self, prompts: Any = None, *, input_ids: Any = None, attention_mask: Any = None,
                 max_new_tokens: int = 64, do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, eos_token_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] = (), streamer: Any = None, cache: KVCache | None = None,
                 donate_cache: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
                 early_stopping: bool | str = False, num_return_sequences: int = 1,
                 output_scores: bool = False, top_logprobs: int = 0, min_new_tokens: int | None = None,
                 no_repeat_ngram_size: int | None = None,
                 bad_words_ids: Sequence[Sequence[int]] | None = None,
                 logits_processor: Sequence[Any] | None = None,
                 stopping_criteria: Sequence[Any] | None = None, json_schema: Any = None,
                 regex: str | None = None, response_format: Any = None,
                 prompt_lookup_num_tokens: int | None = None, max_matching_ngram_size: int | None = None,
                 assistant_model: Model | None = None, num_assistant_tokens: int | None = None,
                 assistant_confidence_threshold: float | None = None) -> Any:
        """Generate for a prompt or a batch of prompts (text, or token id lists), or, as
        transformers takes them, for `input_ids [B, T]` (numpy, lists, or this backend's arrays;
        an array given as `prompts` counts as input_ids) with left-padded `attention_mask`.

        Greedy unless sampling is asked for: `do_sample=True`, or any of temperature (> 0),
        top_k, top_p, min_p given; `temperature=0` means greedy. `num_beams > 1`: beam search
        with transformers' `length_penalty`, `early_stopping` (True, False, "never") and
        `num_return_sequences`. `output_scores`: each token's logprob and its `top_logprobs`
        best alternatives in the result. `min_new_tokens`, `no_repeat_ngram_size`,
        `bad_words_ids`, `logits_processor=[f(ids, scores) -> scores]` and
        `stopping_criteria=[f(ids, scores) -> bool or per-row bools]` (numpy in, numpy out) act
        as transformers' do, in its order. Returns a `GenerationResult`.
        A `cache` to continue is left as it was unless `donate_cache=True` hands it over (see
        `forward`); the result's cache holds the continuation.
        `json_schema` (a dict or its JSON), `regex` or an OpenAI `response_format` constrain
        the output (`gemma_core.structured`, the extra `gemma-core[structured]`).
        `prompt_lookup_num_tokens` (n-gram `max_matching_ngram_size`) or `assistant_model` (a
        draft sharing the vocabulary; `num_assistant_tokens`, `assistant_confidence_threshold`):
        greedy speculative decoding for one prompt, the same ids, and the result's
        `acceptance_rate` (`gemma_core.speculative`).
        """
        from gemma_core.generation import generate
        from gemma_core.processors import processor_config
        from gemma_core.sampling import sampling_config

        sampling = sampling_config(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, repetition_penalty=repetition_penalty)
        if json_schema is not None or regex is not None or response_format is not None:
            from gemma_core.structured import with_constraint

            logits_processor = with_constraint(self, logits_processor, json_schema=json_schema, regex=regex,
                                               response_format=response_format, eos_token_ids=eos_token_ids)
        processors = processor_config(min_new_tokens=min_new_tokens,
                                      no_repeat_ngram_size=no_repeat_ngram_size, bad_words_ids=bad_words_ids,
                                      logits_processor=logits_processor,
                                      stopping_criteria=stopping_criteria)
        if prompt_lookup_num_tokens is not None or assistant_model is not None:
            from gemma_core.speculative import check_speculative, speculative_generate

            spec = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens, "assistant_model": assistant_model,
                    "max_matching_ngram_size": max_matching_ngram_size,
                    "num_assistant_tokens": num_assistant_tokens,
                    "assistant_confidence_threshold": assistant_confidence_threshold}
            check_speculative(self, **spec, sampling=sampling, num_beams=num_beams,
                              num_return_sequences=num_return_sequences, cache=cache)
            return speculative_generate(self, prompts, max_new_tokens=max_new_tokens,
                                        eos_token_ids=eos_token_ids, stop_strings=stop_strings,
                                        streamer=streamer, input_ids=input_ids, attention_mask=attention_mask,
                                        sampling=sampling, processors=processors, output_scores=output_scores,
                                        top_logprobs=top_logprobs, **spec)
        return generate(self, prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                        eos_token_ids=eos_token_ids, stop_strings=stop_strings, streamer=streamer,
                        cache=cache, donate_cache=donate_cache, input_ids=input_ids,
                        attention_mask=attention_mask, processors=processors, output_scores=output_scores,
                        top_logprobs=top_logprobs, num_beams=num_beams, length_penalty=length_penalty,
                        early_stopping=early_stopping, num_return_sequences=num_return_sequences)

    def to_numpy(self, x: Any) -> np.ndarray:
        """Any backend array as numpy (float32 for float dtypes narrower than float32)."""
        return self.backend.to_numpy(x)

    def greedy_tokens(self, logits: Any) -> np.ndarray:
        """Host int64 `[B]`: each row's argmax at the last position of `logits`, ties to the
        lowest id, reduced on the backend's device (`Backend.greedy_tokens`)."""
        return self.backend.greedy_tokens(logits)

    def copy_cache(self, cache: KVCache) -> KVCache:
        """An independent copy of `cache` (new buffers): a fork that can be handed over
        (`forward(..., donate_cache=True)`) while `cache` stays usable."""
        cache.check_usable()
        return KVCache(layers=[self.backend.copy_cache_layer(layer) for layer in cache.layers],
                       length=cache.length, max_length=cache.max_length, valid=cache.valid.copy(),
                       seen=cache.seen.copy(), dynamic=cache.dynamic)

    def export_cache(self, cache: KVCache) -> CacheState:
        """The cache in the contract layout: per layer the last tokens it holds, oldest first."""
        cache.check_usable()
        keys, values, real = [], [], []
        for state in cache.layers:
            k, v = self.backend.export_cache_layer(state)
            order = ring_order(cache.length, k.shape[2])
            keys.append(k[:, :, order])
            values.append(v[:, :, order])
            real.append(cache.valid[:, cache.length - len(order):cache.length])
        return CacheState(tuple(keys), tuple(values), cache.length, cache.seen.copy(), tuple(real))

    def _check_ids(self, input_ids: Any) -> np.ndarray:
        try:  # lists, numpy, this or another framework's tensors (to_numpy falls back to numpy's)
            ids = np.asarray(input_ids if isinstance(input_ids, np.ndarray) else self.to_numpy(input_ids))
        except (ValueError, TypeError) as e:
            raise InputError(f"input_ids: not a [batch, length] array of token ids ({e})") from None
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids: expected a non-empty [batch, length] array, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise InputError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            raise InputError(f"input_ids: token id {int(ids[bad][0])} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        return ids.astype(np.int64)


def _with_hidden_states(graph: Graph, config: GemmaConfig) -> Graph:
    """`graph` also outputting the residual stream `x0..x{L-1}` and `hidden` (the final norm of
    `x{L}` at every position; causal-lm normalises only the gathered logit positions, so the op
    is added there), before the caches. The base task's graph has them already."""
    layers = config.num_layers
    stream = tuple(f"x{i}" for i in range(layers))
    ops = tuple(graph.ops)
    if "hidden" not in {name for op in ops for name in op.outputs}:
        ops += (Op("rms_norm", (f"x{layers}",), ("hidden",), (FINAL_NORM,), {"eps": config.rms_norm_eps}),)
    caches = tuple(cache_name(i) for i in range(layers) if cache_name(i) in graph.outputs)
    head = tuple(name for name in graph.outputs if name not in caches)
    extra = tuple(name for name in ("hidden", *stream) if name not in head)
    return Graph(ops, graph.inputs, (*head, *extra, *caches))


def _check_mask(mask: Any, shape: tuple[int, ...], to_numpy: Any) -> np.ndarray:
    if mask is None:
        return np.ones(shape, bool)
    m = np.asarray(mask if isinstance(mask, np.ndarray) else to_numpy(mask))
    if m.ndim == 1:
        m = m[None]
    if m.shape != shape:
        raise InputError(f"attention_mask: shape {m.shape} differs from input_ids {shape}")
    if not np.isin(m, (0, 1)).all():
        raise InputError("attention_mask: values must be 0 or 1")
    return m.astype(bool)


def _prepare(backend: Backend, config: GemmaConfig, weights: Mapping[str, np.ndarray],
             groups: Mapping[str, Sequence[str]], dtype: str, device: str | None, task: str,
             key: str | None) -> dict[str, Any]:
    """The backend's weights: `weights` with each fused group stacked, converted by the
    backend; through the prepared-weights cache under `key` (`prepared_cache.entry_key`)."""
    from gemma_core import prepared_cache

    if key is not None:
        expected = {**{n: (tuple(w.shape), dtype) for n, w in weights.items()
                       if not any(n in sources for sources in groups.values())},
                    **{n: ((sum(weights[s].shape[0] for s in sources), weights[sources[0]].shape[1]),
                           dtype) for n, sources in groups.items()}}
        hit = prepared_cache.lookup(key, backend, expected)
        if hit is not None:
            return hit
    quant = {"quant": config.quantization} if config.quantization is not None else {}
    out = backend.prepare_weights(_stack(weights, groups, config) if groups else weights, dtype,
                                  device, **quant)
    if key is not None:
        prepared_cache.store(key, backend, out, sum(w.size for w in weights.values()) * ITEMSIZE[dtype])
    return out


def _stack(weights: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[str]],
           config: GemmaConfig) -> dict[str, np.ndarray]:
    """The weights with each fused group's sources stacked along the output axis (and their
    quantisation scales likewise) under the fused name; the sources themselves dropped."""
    out = dict(weights)
    quantized = config.quantization is not None
    for name, sources in groups.items():
        out[name] = np.concatenate([np.asarray(weights[s]) for s in sources], axis=0)
        if quantized and sources[0] + SCALE_SUFFIX in weights:
            out[name + SCALE_SUFFIX] = np.concatenate(
                [np.asarray(weights[s + SCALE_SUFFIX]) for s in sources], axis=0)
        for s in sources:
            out.pop(s, None)
            out.pop(s + SCALE_SUFFIX, None)
    return out
