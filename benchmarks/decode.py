"""Prefill and batch-1 decode speed of gemma-core backends beside Hugging Face transformers, on the
same weights, in the same run, with the ratio to transformers and each engine's peak memory.

    python benchmarks/decode.py                                  # Gemma 3 270M shape, random weights, CPU
    python benchmarks/decode.py --model embedded                 # the real Gemma 3 270M (GGUF, dequantised)
    python benchmarks/decode.py --model gemma-2b --device cuda --dtypes bfloat16 --out gpu.md
    python benchmarks/decode.py --model embedded --dtypes bfloat16 \
        --engines transformers,torch,torch-int8,torch-int4,llama.cpp --llama-python /path/to/python

Each engine runs in its own process (so peak memory is its own); weights are written once as a
Hugging Face folder that every engine loads. Compile time is reported apart from speed.
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

ENGINES = ("transformers", "numpy", "torch", "torch-compile", "jax", "tensorflow")
# Opt-in engines: weight-only quantised torch (quantised on load; run them with --dtypes bfloat16,
# the dtype torch's int8/int4 CPU kernels take), and llama.cpp (llama-cpp-python) on the GGUF
# file itself (--model embedded or a .gguf), in the interpreter given by --llama-python.
QUANT_ENGINES = {f"{engine}-{scheme}": scheme for engine in ("torch", "torch-compile", "jax", "tensorflow")
                 for scheme in ("int8", "int4", "int4-mixed", "nf4")}
LLAMA = "llama.cpp"


def _weights_folder(model: str, work: Path) -> Path:
    """A Hugging Face folder holding the benchmark weights (float32)."""
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
    save_checkpoint(folder, config, weights)
    return folder


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
            "first_call_s": warm_s, "compile_s": 0.0, "peak_rss_mb": _peak_mb()}


def worker(engine: str, dtype: str, folder: str, device: str, prompt_len: int, new_tokens: int,
           gguf: str | None = None) -> dict:
    """Measure one engine in this process. Quantised engines read `gguf` (when the benchmark
    model is one) and quantise it as it is read, as `gemma generate --quantize` does; their
    weights equal those of quantising the float32 folder (tests/test_gguf.py)."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if engine == "transformers":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
        vocab = model.config.vocab_size
    else:
        import gemma_core

        backend = engine.split("-")[0]
        quantize = QUANT_ENGINES.get(engine)
        model = gemma_core.load(gguf if quantize and gguf else folder, backend=backend, dtype=dtype,
                                device=device if backend == "torch" else None,
                                compile=True if engine.startswith("torch-compile") else None,
                                quantize=quantize)
        vocab = model.config.vocab_size
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
        if engine == "transformers":
            with torch.inference_mode():
                model.generate(torch.from_numpy(ids).to(device), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                               streamer=_Stamps())
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
        "peak_rss_mb": _peak_mb(),
    }
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def table(rows: list[dict], title: str) -> str:
    base = {r["dtype"]: r for r in rows if r["engine"] == "transformers" and "error" not in r}
    llama = next((r for r in rows if r["engine"] == LLAMA and "error" not in r), None)
    extra = " decode vs llama.cpp |" if llama else ""
    lines = [f"### {title}", "",
             "| engine | dtype | prefill tok/s | decode tok/s | decode vs transformers |" + extra
             + " compile s | peak RSS MB | peak GPU MB |",
             "|---|---|---|---|---|" + ("---|" if llama else "") + "---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['dtype']} | error: {r['error']} | | | | | |")
            continue
        ref = base.get(r["dtype"])
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref else "-"
        vs_llama = f" {r['decode_tok_s'] / llama['decode_tok_s']:.2f}x |" if llama else ""
        gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
        lines.append(f"| {r['engine']} | {r['dtype']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | "
                     f"{ratio} |{vs_llama} {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} | {gpu} |")
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
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="python with llama-cpp-python installed, for the llama.cpp engine")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker[0] == LLAMA:
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
    with tempfile.TemporaryDirectory() as tmp:
        folder = _weights_folder(args.model, Path(tmp))
        rows = []
        for dtype in args.dtypes.split(","):
            for engine in engines:
                if engine == LLAMA and dtype != args.dtypes.split(",")[0]:
                    continue  # one row: llama.cpp runs the file's own types
                python = args.llama_python if engine == LLAMA else sys.executable
                cmd = [python, __file__, "--worker", engine, dtype, "--folder", str(folder),
                       "--device", args.device, "--prompt-len", str(args.prompt_len),
                       "--new-tokens", str(args.new_tokens), "--threads", str(args.threads),
                       "--gguf", str(gguf)]
                try:
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    if proc.returncode:
                        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    rows.append({"engine": engine, "dtype": dtype, "error": str(e)[:200]})
                print(json.dumps(rows[-1]), file=sys.stderr)
    import platform

    where = f"{args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    title = f"{args.model}, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, {where}"
    text = table(rows, title)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
