"""The `gemma` command line: generate, chat, serve, classify, convert, quantize, finetune, info, graph,
mask, conformance."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gemma_core.config import GemmaConfig
from gemma_core.errors import GemmaError
from gemma_core.notices import printing


def _config_arg(value: str) -> GemmaConfig:
    """A preset name, "embedded", a config.json path, or a checkpoint in any format `load` reads
    (read without its weights where the format allows)."""
    from gemma_core.checkpoint import read_config
    from gemma_core.loading import resolve_source, source_format
    from gemma_core.presets import PRESETS, get_preset

    if value in PRESETS and not os.path.exists(value):
        return get_preset(value)
    value = resolve_source(value)
    path = Path(value)
    if path.is_file() and path.suffix == ".json":  # a config.json: the folder it describes
        path = path.parent
    elif not path.exists() and path.suffix != ".gguf":
        if os.sep in value or value.endswith(".json"):
            raise GemmaError(f"{value}: no such file or folder")
        return get_preset(value)
    fmt = source_format(path)
    if fmt == "gguf":
        from gemma_core.formats.gguf import open_gguf
        from gemma_core.formats.gguf import read_config as gguf_config

        return gguf_config(open_gguf(path), str(path))
    if fmt == "hf":
        return read_config(path if path.is_dir() else path.parent)
    if fmt == "keras-hub":
        from gemma_core.formats import keras_hub

        return keras_hub.read_config(path)
    from gemma_core.formats.convert import read

    return read(path, fmt).config  # flax, gemma-pytorch: the config may come from the weights


class _Progress:
    """A one-line progress bar on stderr, shown only for a terminal or when it takes a while."""

    def __init__(self, label: str) -> None:
        self.label = label

    def __call__(self, done: int, total: int) -> None:
        if not sys.stderr.isatty():
            return
        width = 30
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
        sys.stderr.flush()


def _import_backend(args: argparse.Namespace) -> None:
    """Import the backend asked for and start its device runtime with stderr (fd 2) closed,
    unless --verbose: frameworks' C++ code logs then (TensorFlow's CUDA probe, absl's pre-init
    notice) below Python's reach; an error is still raised, and shown, once stderr is back."""
    import numpy as np

    from gemma_core.backend import get_backend

    def start() -> None:  # import, and put one array on the device: runtimes log as they start
        backend = get_backend(args.backend)
        backend.to_numpy(backend.asarray(np.zeros(1, np.int64), args.device))

    if args.verbose or args.debug:
        start()
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        start()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def auto_dtype(backend: str | None) -> str:
    """`--dtype auto` (`gemma_core.engine_choice.auto_dtype`)."""
    from gemma_core.engine_choice import auto_dtype as choose

    return choose(backend)


def _choose_engine(args: argparse.Namespace) -> str:
    """Settle args.backend, args.dtype and args.compile: with no --backend nor $GEMMA_BACKEND
    the fastest installed engine (`gemma_core.engine_choice`); returns why, for --verbose."""
    from gemma_core.engine_choice import AUTO, resolve

    named = args.backend or os.environ.get("GEMMA_BACKEND") or AUTO
    backend, args.dtype, args.compile, why = resolve(named, args.dtype, args.compile)
    args.backend = backend
    return why


def _compile_notice(args: argparse.Namespace) -> None:
    """A line on stderr before a compiled step first runs (on a terminal or --verbose), so a
    cold compile is not silence: torch's with --compile, jax's and tensorflow's unless
    --no-compile (what each keeps across processes: `gemma_core.compile_cache`)."""
    name = (args.backend or "").split(":")[0]
    compiled = args.compile if name == "torch" else (
        name in ("jax", "tensorflow") and args.compile is not False)
    if not compiled or not (sys.stderr.isatty() or args.verbose):
        return  # (torch's kept decode program says so itself when it compiles: backends/torch/aot)
    kept = {"torch": "prefill in each process: frozen bf16 graphs are not cacheable; the decode "
                     "program is kept",
            "jax": "first run; cached for next time"}
    print(f"gemma: compiling the decode step for {name} {args.dtype} "
          f"({kept.get(name, 'every run')})...", file=sys.stderr, flush=True)


def _load_model(args: argparse.Namespace) -> Any:
    import gemma_core
    from gemma_core.backend import default_backend_name
    from gemma_core.embedded import default_model_path
    from gemma_core.model import DEFAULT_PREFILL_CHUNK
    from gemma_core.tokenizer import GemmaTokenizer

    path = args.model or default_model_path()
    if not args.model and not os.path.exists(path):
        raise GemmaError(f"{path}: the embedded model file is missing")
    quantize = None
    if (args.group_size is not None or args.quantize_modules) and not args.quantize:
        raise GemmaError("--group-size and --quantize-modules apply with --quantize")
    if args.quantize:
        from gemma_core.quant import parse_scheme

        quantize = parse_scheme(args.quantize, args.group_size, modules=args.quantize_modules or "")
    why = _choose_engine(args)
    _import_backend(args)
    dtype = args.dtype
    if args.verbose:
        print(f"gemma: {args.backend or default_backend_name()} backend, {dtype}"
              + ("" if args.compile is None else f", compile={args.compile}")
              + (f" ({why})" if why else ""), file=sys.stderr)
    model = gemma_core.load(path, backend=args.backend, dtype=dtype, device=args.device,
                            progress=_Progress("loading"), quantize=quantize, compile=args.compile,
                            allow_float16=args.allow_float16, adapter=getattr(args, "adapter", None))
    if args.tokenizer:
        model.tokenizer = GemmaTokenizer(args.tokenizer)
    model.prefill_chunk_size = getattr(args, "prefill_chunk_size", DEFAULT_PREFILL_CHUNK) or None
    if model.tokenizer is None:
        raise GemmaError(f"{path}: the model has no tokenizer; pass --tokenizer tokenizer.model")
    _compile_notice(args)
    return model


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p")
             if getattr(args, k) is not None}
    if args.greedy and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise GemmaError(f"--greedy conflicts with {flags}")
    return {**given, "repetition_penalty": args.repetition_penalty,
            "do_sample": False if args.greedy else None}


def cmd_graph(args: argparse.Namespace) -> int:
    from gemma_core.graph import format_graph
    from gemma_core.layout import format_layout

    config = _config_arg(args.config)
    print(format_graph(config))
    if args.weights:
        print("\n# weight layout")
        print(format_layout(config))
    return 0


def _storage(value: str) -> tuple[str, str]:
    """(format, stored dtypes with tensor counts) of a preset, model folder or GGUF file."""
    from collections import Counter

    from gemma_core.presets import PRESETS

    if value in PRESETS and not os.path.exists(value):
        return "preset (random weights)", "float32"
    path = Path(value)
    if path.suffix == ".gguf":
        from gemma_core.formats.gguf import open_gguf

        kinds: Counter[str] = Counter()
        import gguf

        for t in open_gguf(path).tensors.values():
            kinds[gguf.GGMLQuantizationType(t.type_id).name] += 1
        return "gguf", ", ".join(f"{k} x{n}" for k, n in kinds.most_common())
    from gemma_core.checkpoint import INDEX
    from gemma_core.safetensors_io import read_header

    folder = path if path.is_dir() else path.parent
    files = sorted(folder.glob("*.safetensors"))
    dtypes: Counter[str] = Counter()
    for f in files:
        header, _ = read_header(f)
        dtypes.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
    fmt = f"huggingface safetensors ({len(files)} shards)" if (folder / INDEX).is_file() else (
        "huggingface safetensors")
    return fmt, ", ".join(f"{k} x{n}" for k, n in dtypes.most_common())


def _converted_format(value: str) -> tuple[str, Path] | None:
    """(format, path) of a keras-hub, flax or gemma-pytorch checkpoint at `value` (or of the
    folder of a config.json), else None."""
    from gemma_core.loading import source_format

    path = Path(value)
    if not path.exists():  # a preset, or a missing path that _config_arg reports
        return None
    if path.is_file() and path.suffix == ".json":
        path = path.parent
    fmt = source_format(path)
    return (fmt, path) if fmt in ("keras-hub", "flax", "gemma-pytorch") else None


def cmd_info(args: argparse.Namespace) -> int:
    from collections import Counter

    from gemma_core.embedded import default_model_path
    from gemma_core.layout import param_count
    from gemma_core.loading import resolve_source

    source = resolve_source(args.model) if args.model else default_model_path()
    converted = _converted_format(source)
    if converted is not None:  # read once: the config may come from the weights
        from gemma_core.formats.convert import read

        fmt, path = converted
        ckpt = read(path, fmt)
        config = ckpt.config
        counts = Counter(str(v.dtype) for v in ckpt.weights.values())
        dtypes = ", ".join(f"{k} x{n}" for k, n in counts.most_common())
    else:
        config = _config_arg(source)
        fmt, dtypes = _storage(source)
    hf = config.to_hf()
    print(f"source            {source}")
    print(f"format            {fmt}")
    print(f"stored dtypes     {dtypes}")
    print(f"architecture      {config.architecture.value}")
    print(f"parameters        {param_count(config):,}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "sliding_window", "query_pre_attn_scalar", "attn_logit_softcapping",
                "final_logit_softcapping", "rope_parameters"):
        if key in hf:
            print(f"{key:<17} {hf[key]}")
    local = sum(config.is_local(i) for i in range(config.num_layers))
    print(f"layers            {config.num_layers - local} global, {local} local")
    quant = config.quantization
    if quant is not None:
        print(f"quantization      {quant.describe()}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`gemma cache info|clear`: the user cache (gemma_core.compile_cache) of compiled steps,
    decoded GGUF files (load/) and torch's prepared weights (prepared/)."""
    from gemma_core import compile_cache

    if args.action == "clear":
        removed = compile_cache.clear()
        print(f"removed {compile_cache.cache_dir()} ({removed / 2**20:.1f} MiB)")
    else:
        print(compile_cache.format_info(compile_cache.info()))
    return 0


def _case_progress() -> Any:
    """A line on stderr per conformance cell as it ends, with its time (no silence over cases
    that compile for seconds)."""
    import time

    last = [time.perf_counter()]

    def show(result: Any) -> None:
        now = time.perf_counter()
        print(f"  {result.backend} {result.dtype} {result.case}: {result.status} ({now - last[0]:.1f} s)",
              file=sys.stderr, flush=True)
        last[0] = now

    return show


def cmd_conformance(args: argparse.Namespace) -> int:
    from conformance import reports
    from conformance.runner import run_conformance

    backends = args.backends.split(",") if args.backends else None
    dtypes = args.dtypes.split(",")
    # an unknown case name is a ConfigError from run_conformance: one `gemma: error:` line, exit 2
    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    if args.grad:  # the gradient cases (conformance.grad) in place of the forward ones
        from conformance.grad import run_grad_conformance

        if args.model or args.device:
            raise GemmaError("--grad runs the random-weight gradient cases on the CPU; "
                             "--model and --device do not apply")
        results = run_grad_conformance(backends, dtypes, cases or None)
    else:
        results = run_conformance(backends, dtypes, cases or None, model=args.model, device=args.device,
                                  progress=_case_progress() if sys.stderr.isatty() or args.verbose else None)
    print(reports.as_json(results) if args.json else reports.as_text(results))
    for path, render in ((args.junit, reports.as_junit), (args.markdown, reports.as_markdown)):
        if path:
            Path(path).write_text(render(results))
    return 1 if reports.counts(results)["fail"] else 0


def _read_prompt(args: argparse.Namespace) -> str:
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise GemmaError("no prompt: pass it as an argument or on stdin")
        data = sys.stdin.buffer.read()
        try:
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GemmaError(f"prompt: stdin is not valid UTF-8 (byte {data[e.start]:#04x} at "
                             f"offset {e.start})") from None
        # a piped prompt ends with the line end `echo` adds: strip it, as transformers' CLI does
        prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt.removesuffix("\n")
    else:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GemmaError(f"prompt: the argument is not valid UTF-8 (at character {e.start})") from None
    if not prompt.strip():
        raise GemmaError("prompt: empty")
    return prompt


def _printer(event: Any) -> None:
    sys.stdout.write(event.text_deltas[0])
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    kwargs = _sampling_kwargs(args)
    if args.json_schema is not None or args.regex is not None:  # checked before the model loads
        from gemma_core.structured import schema_argument

        kwargs.update(regex=args.regex,
                      json_schema=None if args.json_schema is None else schema_argument(args.json_schema))
    if args.prompt_lookup is not None and args.draft_model is not None:
        raise GemmaError("--prompt-lookup and --draft-model: candidates come from one of them")
    if args.prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = args.prompt_lookup
    model = _load_model(args)
    if args.draft_model is not None:  # the target's backend, dtype and device
        import gemma_core

        kwargs["assistant_model"] = gemma_core.load(args.draft_model, backend=args.backend, dtype=model.dtype,
                                                    device=args.device, compile=args.compile)
    if args.chat_template:
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    else:
        ids = model.tokenizer.encode(prompt)
    if args.num_beams > 1:  # beams cannot stream: the best is known at the end
        res = model.generate([ids], max_new_tokens=args.max_new_tokens, stop_strings=args.stop or (),
                             num_beams=args.num_beams, **kwargs)
        sys.stdout.write(res.texts[0])
    else:
        res = model.generate([ids], max_new_tokens=args.max_new_tokens, seed=args.seed,
                             stop_strings=args.stop or (), streamer=_printer, **kwargs)
        if args.verbose and res.acceptance_rate is not None:
            print(f"\ngemma: speculative acceptance {res.acceptance_rate:.1%}", file=sys.stderr)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from gemma_core.chat import ChatSession

    kwargs = _sampling_kwargs(args)
    session = ChatSession(_load_model(args), system=args.system, context=args.context)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        session.send(line, max_new_tokens=args.max_new_tokens, streamer=_printer, seed=args.seed,
                     **kwargs)
        sys.stdout.write("\n")


def cmd_serve(args: argparse.Namespace) -> int:
    """`gemma serve`: the OpenAI-compatible HTTP server over the batching engine."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:  # before loading a model for nothing
        raise GemmaError(f"gemma serve needs {', '.join(missing)}: pip install 'gemma-core[serve]'")
    from gemma_core.serving.engine import Engine
    from gemma_core.serving.server import serve

    if args.request_timeout is not None and not args.request_timeout > 0:
        raise GemmaError(f"--request-timeout: must be a positive number of seconds, "
                         f"got {args.request_timeout}")
    name = args.served_model_name or (Path(args.model).stem if args.model else "embedded")
    model = _load_model(args)
    if model.backend.name == "torch" and not model.static_shapes:  # torch's decode program (built
        # the first time, ~2 min: backends/torch/aot.py) before the first request rather than in it
        model.generate([[model.config.bos_token_id]], max_new_tokens=2, eos_token_ids=[])
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, context=args.context)
    key = args.api_key or os.environ.get("GEMMA_API_KEY") or None
    banner = (f"gemma: serving {name} on http://{args.host}:{args.port}/v1 (context {engine.context}, "
              f"batch {args.max_batch}{', API key required' if key else ''})")
    serve(engine, model_name=name, host=args.host, port=args.port, api_key=key,
          request_timeout=args.request_timeout, log_level="info" if args.verbose else "warning",
          on_listen=lambda: print(banner, file=sys.stderr))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np

    import gemma_core
    from gemma_core.tokenizer import GemmaTokenizer

    text = _read_prompt(args)
    _import_backend(args)
    model = gemma_core.load(args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                            task="sequence-classification")
    if args.tokenizer:
        model.tokenizer = GemmaTokenizer(args.tokenizer)
    if model.tokenizer is None:
        raise GemmaError(f"{args.model}: the model has no tokenizer; pass --tokenizer tokenizer.model")
    ids = np.array([model.tokenizer.encode(text)])
    logits = model.to_numpy(model.forward(ids).logits)[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for i in np.argsort(-probs)[: args.top or len(probs)]:
        print(f"{model.labels[i]:<24} {probs[i]:.4f}")
    return 0


def _source_tokenizer(flag: str | None, source: str, config: GemmaConfig) -> Any:
    """The tokenizer `--tokenizer` names, else the checkpoint's own (a GGUF's metadata, a
    tokenizer.model beside it), else None (a preset has none)."""
    from gemma_core.loading import find_tokenizer, resolve_source
    from gemma_core.tokenizer import GemmaTokenizer

    if flag:
        return GemmaTokenizer(flag)
    path = resolve_source(source)
    if path.endswith(".gguf") and os.path.isfile(path):
        from gemma_core.formats.gguf import build_tokenizer_proto, open_gguf

        reader = open_gguf(path)
        if reader.meta.get("tokenizer.ggml.tokens") is None:
            return None
        chat = "gemma3" if config.architecture.value == "gemma3" else "gemma"
        return GemmaTokenizer(build_tokenizer_proto(reader), chat_format=chat)
    if os.path.exists(path):
        return find_tokenizer(path, config)
    return None


def cmd_mask(args: argparse.Namespace) -> int:
    import numpy as np

    from gemma_core.cache import batch_ids
    from gemma_core.masks import attention_mask

    config = _config_arg(args.config)
    if args.sliding_window is not None:
        config = config.replace(sliding_window=args.sliding_window)
    tokenizer = _source_tokenizer(args.tokenizer, args.config, config)
    rows = []
    for text in args.texts:
        if not text.strip():
            raise GemmaError("text: empty")
        if tokenizer is not None:
            ids = tokenizer.encode(text)
            rows.append([tokenizer.decode([i]) or "<bos>" for i in ids])
        else:
            rows.append(text.split())
    _, mask = batch_ids([list(range(len(r))) for r in rows])
    width = mask.shape[1]
    labels = [["<pad>"] * (width - len(r)) + r for r in rows]
    kinds: dict[int | None, list[int]] = {}
    for layer in range(config.num_layers):
        kinds.setdefault(config.window(layer), []).append(layer)
    slots = np.arange(width)
    for window, layers in kinds.items():
        kind = f"sliding window {window}" if window else "global (causal)"
        print(f"{kind}: layers {', '.join(map(str, layers))}")
        visible = attention_mask(slots, slots, mask.astype(bool), window)[:, 0]
        shown_rows = [[repr(n)[1:-1][:10] for n in names] for names in labels]
        pad = max(len(n) for shown in shown_rows for n in shown)
        for b, shown in enumerate(shown_rows):
            if len(labels) > 1:
                print(f"  row {b}")
            for q in range(width):
                cells = " ".join("■" if visible[b, q, k] else "⬚" for k in range(width))
                print(f"  {q:>3} {shown[q]:<{pad}} {cells}")
        print()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from gemma_core.formats.convert import convert, detect

    source_format = detect(args.src)
    bars: dict[str, _Progress] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bars.setdefault(stage, _Progress(stage))(done, total)

    ckpt = convert(args.src, args.dst, args.to, args.dtype, progress, overwrite=args.overwrite,
                   source_format=source_format)
    print(f"{args.src} ({source_format}) -> {args.dst} ({args.to}): {ckpt.config.architecture.value}, "
          f"{len(ckpt.weights)} tensors checked", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gemma_core.formats.convert import quantize
    from gemma_core.quant import parse_scheme

    scheme = args.scheme or {8: "int8", 4: "int4"}[args.bits]
    if (args.bits == 8 and scheme != "int8") or (args.bits == 4 and scheme == "int8"):
        raise GemmaError(f"--scheme {scheme} does not store {args.bits} bits")
    quant = parse_scheme(scheme, args.group_size, embedding=args.embedding, modules=args.modules or "")
    bars: dict[str, _Progress] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bars.setdefault(stage, _Progress(stage))(done, total)

    ckpt = quantize(args.src, args.dst, quant, progress, overwrite=args.overwrite)
    stored = sum(v.nbytes for v in ckpt.weights.values())
    print(f"{args.src} -> {args.dst}: {quant.describe()}, {stored / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from gemma_core.backend import BackendChoices
    from gemma_core.generation import DEFAULT_MAX_NEW_TOKENS
    from gemma_core.model import DTYPES

    p.add_argument("--model", help="checkpoint in any format convert reads (hf, keras-hub, flax, "
                                   "gemma-pytorch, gguf), 'embedded' or a preset (default: embedded)")
    p.add_argument("--tokenizer", help="a tokenizer.model file (for models that lack one)")
    p.add_argument("--backend", default=None, choices=BackendChoices(),
                   help="backend, or NAME:VARIANT such as array_api:torch (default: $GEMMA_BACKEND, "
                        "else the fastest installed: torch, jax, numpy; --verbose says which)")
    p.add_argument("--dtype", default="auto", choices=(*DTYPES, "auto"),
                   help="compute dtype; auto: bfloat16 on framework backends, float32 on numpy")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="run the step through the backend's compiler (torch.compile, XLA) or not "
                        "(default: the backend's: eager torch and numpy, compiled jax and tensorflow)")
    p.add_argument("--allow-float16", action="store_true",
                   help="run Gemma 2/3 in float16 anyway (their activations exceed its range)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: the backend's)")
    p.add_argument("--quantize", choices=("int8", "int4", "int4-mixed", "nf4"),
                   help="quantise the weights on load (weight-only; fastest with --dtype bfloat16); "
                        "int4-mixed: int4 with v_proj and down_proj in int8, half int4's quality cost")
    p.add_argument("--group-size", type=int, help="int4/nf4 group size: 32 (default), 64 or 128")
    p.add_argument("--quantize-modules", metavar="MODULE=SCHEME,...",
                   help="projections stored otherwise in every layer, e.g. v_proj=int8,down_proj=int8 "
                        "(more bits where 4 cost the most, as llama.cpp's Q4_K_M) or o_proj=float")
    p.add_argument("--adapter", metavar="DIR",
                   help="a LoRA adapter folder in PEFT's format (adapter_config.json + "
                        "adapter_model.safetensors), run unmerged over the model (QLoRA with --quantize)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="tokens to generate at most")
    _add_prefill_chunk_size(p)
    p.add_argument("--temperature", type=float, help="sample at this temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample within this cumulative probability")
    p.add_argument("--min-p", type=float, help="drop tokens below this share of the best")
    p.add_argument("--repetition-penalty", type=float, help="transformers' repetition penalty")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=_nonnegative_int, default=None, help="sampling seed")


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is None or the text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _SubParser(argparse.ArgumentParser):
    """A subcommand's parser: defaults in --help, and a usage error as one line (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gemma: error: {message} (see gemma {self.prog.split()[-1]} --help)\n")


def _add_prefill_chunk_size(p: argparse.ArgumentParser) -> None:
    """`--prefill-chunk-size`, shared by generate and serve."""
    from gemma_core.model import DEFAULT_PREFILL_CHUNK

    p.add_argument("--prefill-chunk-size", type=_nonnegative_int, default=DEFAULT_PREFILL_CHUNK,
                   help="prefill longer prompts in steps of this many tokens, bounding their memory "
                        "(llama.cpp's --ubatch-size; 0: the whole prompt in one step)")


def build_parser() -> argparse.ArgumentParser:
    from gemma_core.backend import BackendChoices
    from gemma_core.model import DTYPES

    parser = argparse.ArgumentParser(prog="gemma", description="Gemma 1/2/3 on any backend.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--verbose", action="store_true",
                        help="let third-party libraries (TensorFlow, XLA, absl) log to stderr")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=_SubParser)  # every --help shows the defaults

    p = sub.add_parser("generate", help="continue a prompt (argument or stdin), streaming the text")
    _add_model_args(p)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn")
    p.add_argument("--num-beams", type=_positive_int, default=1,
                   help="beam search over this many beams (greedy; prints the best beam at the end)")
    p.add_argument("--json-schema", metavar="FILE|JSON",
                   help="constrain the output to this JSON schema (needs gemma-core[structured])")
    p.add_argument("--regex", metavar="R", help="constrain the output to match this regular expression "
                   "(needs gemma-core[structured])")
    p.add_argument("--prompt-lookup", type=_positive_int, metavar="K", help="speculative decoding: "
                   "propose K tokens by n-gram lookup in the prompt (greedy; same output, faster on "
                   "repetitive text)")
    p.add_argument("--draft-model", metavar="PATH", help="speculative decoding: a smaller Gemma with "
                   "the same vocabulary proposes the tokens (greedy; same output)")
    p.add_argument("prompt", nargs="?")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat; the KV cache is kept between turns")
    _add_model_args(p)
    p.add_argument("--system", help="system prompt (Gemma 3 folds it into the first turn)")
    p.add_argument("--context", type=_positive_int, default=4096, help="tokens the conversation may use")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
                                     "/v1/chat/completions, streaming)")
    p.add_argument("--model", help="checkpoint in any format, 'embedded' or a preset (default: embedded)")
    p.add_argument("--tokenizer", help="a tokenizer.model file (for models that lack one)")
    p.add_argument("--backend", default=None, choices=BackendChoices())
    p.add_argument("--dtype", default="float32", choices=(*DTYPES, "auto"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: the backend's)")
    p.add_argument("--quantize", choices=("int8", "int4", "int4-mixed", "nf4"),
                   help="quantise the weights on load (weight-only)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder in PEFT's format")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_nonnegative_int, default=8000)
    _add_prefill_chunk_size(p)
    p.add_argument("--max-batch", type=_positive_int, default=8, help="requests decoded together")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="requests waiting for a batch slot; past it: HTTP 429")
    p.add_argument("--context", type=_positive_int, default=None,
                   help="prompt + max_tokens one request may use (default: the model's, at most 2048)")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/* (or $GEMMA_API_KEY)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="cancel a request after S seconds (HTTP 504)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the --model file "
                                               "or folder name, or 'embedded')")
    p.set_defaults(func=cmd_serve, group_size=None, quantize_modules=None, allow_float16=False)

    p = sub.add_parser("classify", help="label a text with a sequence-classification checkpoint")
    p.add_argument("--model", required=True, help="a Hugging Face *ForSequenceClassification folder")
    p.add_argument("--tokenizer", help="a tokenizer.model file (for folders that lack one)")
    p.add_argument("--backend", default=None, choices=BackendChoices())
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default=None)
    p.add_argument("--top", type=_nonnegative_int, default=0, help="print only the N most likely labels")
    p.add_argument("prompt", nargs="?", help="the text (or stdin)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("mask", help="show which tokens each token attends to, per layer kind")
    p.add_argument("--config", default="embedded",
                   help="preset name, checkpoint (any format), config.json or 'embedded'")
    p.add_argument("--tokenizer", help="a tokenizer.model file (default: the checkpoint's own, "
                                       "else split on whitespace)")
    p.add_argument("--sliding-window", type=int, help="override the config's window")
    p.add_argument("texts", nargs="+", help="one text, or several to see left padding")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("convert", help="convert weights between hf, keras-hub, flax, gemma-pytorch, gguf")
    p.add_argument("src", help="checkpoint file or folder (format detected)")
    p.add_argument("dst", help="output path (written to a temporary path, renamed when complete)")
    p.add_argument("--to", required=True, choices=("hf", "keras-hub", "flax", "gemma-pytorch", "gguf"),
                   help="output format (flax: orbax folder, or a flat tree if DST ends .safetensors; "
                        "gemma-pytorch: a folder, or one file if DST ends .ckpt)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "q8_0"),
                   help="cast floating weights (default: keep); q8_0 for gguf only")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write a weight-only quantised Hugging Face folder (int8, int4, nf4)")
    p.add_argument("src", help="checkpoint file or folder in any supported format")
    p.add_argument("dst", help="output folder (written to a temporary path, renamed when complete)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True)
    p.add_argument("--group-size", type=int, help="4-bit group size: 32 (default), 64 or 128")
    p.add_argument("--scheme", choices=("int8", "int4", "int4-mixed", "nf4"),
                   help="4 bits: int4 (default), int4-mixed (v_proj and down_proj in int8) or nf4")
    p.add_argument("--embedding", choices=("int8", "int4", "nf4", "float"), default="int8",
                   help="the embedding and (tied) LM head: int8 (default, as llama.cpp's Q4_K_M), "
                        "4 bits, or float")
    p.add_argument("--modules", metavar="MODULE=SCHEME,...",
                   help="projections stored otherwise in every layer, e.g. v_proj=int8,down_proj=int8 "
                        "(more bits where 4 cost the most, as llama.cpp's Q4_K_M) or o_proj=float")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_quantize)

    from gemma_core.cli_finetune import add_finetune_parser

    add_finetune_parser(sub, _positive_int)

    p = sub.add_parser("graph", help="print a config's op list")
    p.add_argument("--config", default="embedded",
                   help="preset name, checkpoint (any format), config.json or 'embedded'")
    p.add_argument("--weights", action="store_true", help="also print the weight layout table")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("info", help="format, dtypes, config and parameter count of a model")
    p.add_argument("--model", help="preset, checkpoint (any format) or 'embedded' (the default)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("cache", help="the cache of compiled steps: where it is and its size, or clear it")
    p.add_argument("action", choices=("info", "clear"), nargs="?", default="info")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("conformance", help="compare backends with the NumPy reference")
    p.add_argument("--backends", help="comma-separated (default: every known backend; "
                                      "ones not installed are skipped)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--model", help="run the model comparisons on this checkpoint (any format)")
    p.add_argument("--device", help="device for every backend's models and op inputs (e.g. cuda, "
                                    "gpu:1); backends that do not declare it are skipped")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML (for CI systems)")
    p.add_argument("--markdown", metavar="FILE", help="also write a Markdown summary")
    p.add_argument("--grad", action="store_true", help="run the gradient cases instead: every "
                   "weight's loss gradient against the float64 NumPy oracle (conformance.grad)")
    p.set_defaults(func=cmd_conformance)
    return parser


def _nonnegative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return n


def _positive_int(value: str) -> int:
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    import logging
    import threading
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.verbose or args.debug):  # before any framework is imported: no C++ log lines
        for name, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TF_ENABLE_ONEDNN_OPTS", "0"),
                            ("GRPC_VERBOSITY", "ERROR"), ("GLOG_minloglevel", "3")):
            os.environ.setdefault(name, value)

    def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: Any = None, line: str | None = None) -> None:
        print(f"gemma: warning: {_one_line(message)}", file=sys.stderr)

    hooks = (warnings.showwarning, sys.unraisablehook, threading.excepthook)
    if not (args.debug or args.verbose):  # third-party noise (absl/orbax logs, their threads)
        warnings.showwarning = show_warning
        logging.disable(logging.CRITICAL)
        sys.unraisablehook = lambda unraisable: None
        threading.excepthook = lambda exc: None
    try:
        with printing():  # gemma-core's own notices (a cold compile) even with logging off
            return _run(args)
    finally:
        if argv is not None:  # called in-process: leave the caller's process as it was; as the
            # program itself (argv from sys.argv) the quiet hooks stay until exit, since
            # third-party threads (orbax's) may still fail after a failed write has returned
            warnings.showwarning, sys.unraisablehook, threading.excepthook = hooks
            logging.disable(logging.NOTSET)


def _run(args: argparse.Namespace) -> int:
    """`args.func(args)`, its errors as one line on stderr and an exit status."""
    from gemma_core.transaction import Interrupted

    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `gemma graph ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (GemmaError, OSError) as e:
        if args.debug:
            raise
        print(f"gemma: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"gemma: {e}; the partial output was removed", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        return 130
    except (ValueError, RecursionError, RuntimeError, KeyError, IndexError, TypeError, MemoryError,
            EOFError) as e:  # raised by a third-party reader on a malformed file
        if args.debug:
            raise
        print(f"gemma: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
              file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The `gemma` command: `main()`, then the exit handlers and a flush of the streams, and an
    exit without Python's finalisation, which frees torch's objects one by one (~0.7 s of a
    warm `gemma generate` on the real 270M, after its last token). Where another thread still
    runs, or a stream cannot be flushed, the exit is Python's own."""
    import atexit
    import threading

    code = main()
    main_thread = threading.main_thread()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not main_thread):
        sys.exit(code)  # (Python waits for them)
    atexit._run_exitfuncs()  # (CPython's: what sys.exit would run first; each runs once)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: Python's exit reports it as it always does
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    entry()
