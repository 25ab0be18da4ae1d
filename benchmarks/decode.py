"""Prefill and batch-1 decode speed of gemma-core backends beside Hugging Face transformers, on the
same weights, in the same run, with the ratio to transformers and each engine's peak memory.

    python benchmarks/decode.py                                  # Gemma 3 270M shape, random weights, CPU
    python benchmarks/decode.py --model embedded                 # the real Gemma 3 270M (GGUF, dequantised)
    python benchmarks/decode.py --model gemma-2b --device cuda --dtypes bfloat16 --out gpu.md
    bash benchmarks/gpu.sh OUT_DIR                               # the GPU figures, one command
    python benchmarks/decode.py --model embedded --dtypes bfloat16 \
        --engines transformers,torch,torch-int8,torch-int4,llama.cpp --llama-python /path/to/python

Each engine runs in its own process (so peak memory is its own); weights are written once as a
Hugging Face folder that every engine loads. Compile time is reported apart from speed.

Batch-1 decode reads every weight once a token, so memory bandwidth caps it: the table gives
each engine's decode speed as a share of that cap, the bytes of weights it reads a token (the
tied embedding once, as the LM head; quantised values and scales as stored) times its tokens/s
over the device's copy bandwidth (bytes read and written a second by a device-to-device copy of
1 GiB, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# "torch" is the default engine (a GGUF model's decode by its kept AOT program, prefill eager);
# "torch-eager" is --no-compile
ENGINES = ("transformers", "numpy", "torch", "torch-eager", "torch-compile", "jax", "tensorflow")
# Opt-in engines: weight-only quantised torch (quantised on load; run them with --dtypes bfloat16,
# the dtype torch's int8/int4 CPU kernels take), and llama.cpp (llama-cpp-python) on the GGUF
# file itself (--model embedded or a .gguf), in the interpreter given by --llama-python.
QUANT_ENGINES = {f"{engine}-{scheme}": scheme for engine in ("torch", "torch-compile", "jax", "tensorflow")
                 for scheme in ("int8", "int4", "int4-mixed", "nf4")}
LLAMA = "llama.cpp"
# transformers with its static cache (`cache_implementation="static"`), as its docs advise for speed
HF_STATIC = "transformers-static"


def engine_compile(engine: str) -> bool | None:
    """The `compile` setting of a gemma engine name: "torch-compile*" True, "torch-eager" False,
    any other None (the backend's default: for torch, a GGUF model's kept decode program)."""
    return True if engine.startswith("torch-compile") else False if engine == "torch-eager" else None


def _weights_folder(model: str, work: Path, dtype: str = "float32") -> Path:
    """A Hugging Face folder holding the benchmark weights (random ones in `dtype`)."""
    import gemma_core
    from gemma_core.checkpoint import save_checkpoint
    from gemma_core.embedded import default_model_path
    from gemma_core.formats.gguf import load_gguf
    from gemma_core.weights import random_weights

    folder = work / "weights"
    if model == "embedded" or model.endswith(".gguf"):
        config, weights, _ = load_gguf(default_model_path() if model == "embedded" else model)
    elif os.path.isdir(model):
        return Path(model)
    else:
        config = gemma_core.get_preset(model)
        weights = random_weights(config, 0)
    save_checkpoint(folder, config, weights, dtype=dtype)
    return folder


def weight_bytes(config: Any, dtype: str) -> int:
    """Bytes of weights that one decode step of a gemma-core model reads (see the docstring)."""
    import numpy as np

    from gemma_core.layout import iter_params
    from gemma_core.quant import stored_dtype, stored_shapes

    quant = config.quantization
    total = 0
    for name, shape, _ in iter_params(config):
        scheme = quant.scheme_for(name) if quant is not None else None
        if scheme is None:
            total += int(np.prod(shape)) * _ITEMSIZE[dtype]
            continue
        for stored, stored_shape in stored_shapes(name, shape, scheme, quant.group_size).items():
            size = 4 if stored.endswith("_scale") else stored_dtype(scheme).itemsize
            total += int(np.prod(stored_shape)) * size
    return total


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def bandwidth_worker(device: str) -> dict:
    """Copy bandwidth of `device`: bytes read and written a second by copying 1 GiB (best of 5)."""
    import torch

    src = torch.ones(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(6):  # the first copy is a warm-up (page faults, clocks)
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0) if _ else best
    import platform

    name = (torch.cuda.get_device_name(src.device) if src.is_cuda
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    return {"engine": "bandwidth", "device": device, "name": name,
            "copy_gb_s": 2 * src.nbytes / best / 1e9}


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def llama_worker(gguf: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    """llama.cpp (llama-cpp-python) on the GGUF file: greedy, batch 1, timed per streamed token."""
    import llama_cpp
    import numpy as np

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt_len + new_tokens + 8, n_threads=threads,
                          n_batch=prompt_len, verbose=False)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(3, llm.n_vocab(), prompt_len).tolist()
    ids[0] = 2

    def generate() -> tuple[float, float]:
        llm.reset()
        stamps = []
        t0 = time.perf_counter()
        for _ in llm.create_completion(ids, max_tokens=new_tokens, temperature=0.0, stream=True):
            stamps.append(time.perf_counter())
        if len(stamps) < 2:
            raise RuntimeError(f"llama.cpp stopped after {len(stamps)} tokens")
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    t0 = time.perf_counter()
    generate()
    warm_s = time.perf_counter() - t0
    runs = [generate() for _ in range(3)]
    return {"engine": LLAMA, "dtype": "Q4_K_M", "device": "cpu",
            "prefill_tok_s": prompt_len / _median([r[0] for r in runs]),
            "decode_tok_s": 1.0 / _median([r[1] for r in runs]), "load_s": load_s,
            "first_call_s": warm_s, "compile_s": 0.0, "peak_rss_mb": _peak_mb(),
            "weight_bytes": os.path.getsize(gguf)}  # the file: its weights and a small header


def worker(engine: str, dtype: str, folder: str, device: str, prompt_len: int, new_tokens: int,
           gguf: str | None = None) -> dict:
    """Measure one engine in this process. Quantised engines read `gguf` (when the benchmark
    model is one) and quantise it as it is read, as `gemma generate --quantize` does; their
    weights equal those of quantising the float32 folder (tests/test_gguf.py)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if engine in ("transformers", HF_STATIC):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
        vocab = model.config.vocab_size
        read_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    else:
        import gemma_core

        backend = engine.split("-")[0]
        quantize = QUANT_ENGINES.get(engine)
        model = gemma_core.load(gguf if quantize and gguf else folder, backend=backend, dtype=dtype,
                                device=device if backend == "torch" else None,
                                compile=engine_compile(engine),
                                quantize=quantize)
        vocab = model.config.vocab_size
        read_bytes = weight_bytes(model.config, dtype)
    load_s = time.perf_counter() - t0
    ids = rng.integers(3, vocab, (1, prompt_len))
    ids[0, 0] = 2
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stamps: list[float] = []

    class _Stamps:  # transformers streamer protocol: put() once for the prompt, then per token
        def put(self, value: Any) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate() -> tuple[float, float]:
        """(time to the first new token, seconds per later token) of one greedy generation."""
        stamps.clear()
        t0 = time.perf_counter()
        if engine in ("transformers", HF_STATIC):
            static = {"cache_implementation": "static"} if engine == HF_STATIC else {}
            with torch.inference_mode():
                model.generate(torch.from_numpy(ids).to(device), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                               streamer=_Stamps(), **static)
            first, last = stamps[1], stamps[-1]  # stamps[0] is the prompt
        else:
            model.generate([ids[0].tolist()], max_new_tokens=new_tokens, eos_token_ids=[],
                           streamer=lambda event: (sync(), stamps.append(time.perf_counter())))
            first, last = stamps[0], stamps[-1]
        return first - t0, (last - first) / (new_tokens - 1)

    t0 = time.perf_counter()
    generate()  # warm-up (and compilation for compiled engines)
    warm_s = time.perf_counter() - t0
    runs = [generate() for _ in range(3)]
    ttft = _median([r[0] for r in runs])
    per_token = _median([r[1] for r in runs])
    out = {
        "engine": engine, "dtype": dtype, "device": device,
        "prefill_tok_s": prompt_len / ttft, "decode_tok_s": 1.0 / per_token,
        "load_s": load_s, "first_call_s": warm_s,
        "compile_s": max(warm_s - ttft - per_token * (new_tokens - 1), 0.0)
        if engine.startswith("torch-compile") or engine.split("-")[0] in ("jax", "tensorflow") else 0.0,
        "peak_rss_mb": _peak_mb(), "weight_bytes": read_bytes,
    }
    if device.startswith("cuda") and engine.startswith("jax"):  # jax holds the GPU by itself
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["peak_gpu_mb"] = stats["peak_bytes_in_use"] / 2**20
    elif device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def table(rows: list[dict], title: str, copy_gb_s: float | None = None) -> str:
    """The markdown table of `rows`, with ratios to transformers (and llama.cpp) and each
    decode speed as a share of the bandwidth cap (`copy_gb_s`, when measured)."""
    base = {r["dtype"]: r for r in rows if r["engine"] == "transformers" and "error" not in r}
    llama = next((r for r in rows if r["engine"] == LLAMA and "error" not in r), None)
    extra = " decode vs llama.cpp |" if llama else ""
    lines = [f"### {title}", "",
             "| engine | dtype | prefill tok/s | decode tok/s | decode vs transformers |" + extra
             + " weights MB/token | of bandwidth cap | compile s | peak RSS MB | peak GPU MB |",
             "|---|---|---|---|---|" + ("---|" if llama else "") + "---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['dtype']} | error: {r['error']} |" + " |" * (7 + bool(llama)))
            continue
        ref = base.get(r["dtype"])
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        vs_llama = f" {r['decode_tok_s'] / llama['decode_tok_s']:.2f}x |" if llama else ""
        gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
        read = r.get("weight_bytes")
        share = f"{r['decode_tok_s'] * read / (copy_gb_s * 1e9):.0%}" if read and copy_gb_s else "-"
        mb = "-" if not read else f"{read / 2**20:.0f}" if read >= 10 * 2**20 else f"{read / 2**20:.2f}"
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
                     f"{ratio} |{vs_llama} {mb} | {share} | {r['compile_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {gpu} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m", help="preset, HF folder, .gguf or 'embedded'")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per engine")
    parser.add_argument("--weights-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="dtype of the random weights' folder (bfloat16 halves its writing "
                             "and reading, for large shapes)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="python with llama-cpp-python installed, for the llama.cpp engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker[0] == "bandwidth":
            print(json.dumps(bandwidth_worker(args.device)))
        elif args.worker[0] == LLAMA:
            print(json.dumps(llama_worker(args.gguf, args.prompt_len, args.new_tokens, args.threads)))
        else:
            print(json.dumps(worker(*args.worker, args.folder, args.device, args.prompt_len,
                                    args.new_tokens, args.gguf if args.gguf != "None" else None)))
        return 0
    engines = args.engines.split(",")
    gguf = None
    if args.model == "embedded" or args.model.endswith(".gguf"):
        from gemma_core.embedded import default_model_path

        gguf = default_model_path() if args.model == "embedded" else args.model
    if LLAMA in engines and gguf is None:
        parser.error("the llama.cpp engine needs --model embedded or a .gguf file")

    def run_worker(engine: str, dtype: str, folder: Path | str) -> dict:
        python = args.llama_python if engine == LLAMA else sys.executable
        cmd = [python, __file__, "--worker", engine, dtype, "--folder", str(folder),
               "--device", args.device, "--prompt-len", str(args.prompt_len),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
               "--gguf", str(gguf)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row = {"engine": engine, "dtype": dtype, "error": str(e)[:200]}
        print(json.dumps(row), file=sys.stderr)
        return row

    copy = run_worker("bandwidth", "-", "-")
    copy_gb_s = copy.get("copy_gb_s")
    where = f"{args.device} ({copy.get('name', '?')})"
    title = (f"{args.model}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {where}"
             + (f", copy bandwidth {copy_gb_s:.0f} GB/s" if copy_gb_s else ""))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _weights_folder(args.model, Path(tmp), args.weights_dtype)
        rows = []
        for dtype in args.dtypes.split(","):
            for engine in engines:
                if engine == LLAMA and dtype != args.dtypes.split(",")[0]:
                    continue  # one row: llama.cpp runs the file's own types
                rows.append(run_worker(engine, dtype, folder))
                if args.out:  # so far: a run stopped early keeps what it measured
                    Path(args.out).write_text(table(rows, title, copy_gb_s) + "\n")
    text = table(rows, title, copy_gb_s)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
