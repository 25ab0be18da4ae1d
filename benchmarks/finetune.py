"""LoRA fine-tuning speed and loss of gemma-core's trainers beside transformers + PEFT, on the same
weights, data, adapter init and settings, in the same run.

    python benchmarks/finetune.py                         # the real Gemma 3 270M (GGUF, dequantised)
    python benchmarks/finetune.py --model gemma-3-270m --steps 4 --out results.md

Every engine runs in its own process (peak memory is its own) and trains `--steps` optimizer
steps of LoRA (rank 8, q/k/v/o, float32, AdamW lr 2e-4) on the same packed batches of
`tests/data/quality.txt` tokenized by the model's tokenizer (gemma_core.data: one seeded order).
gemma-core's engines run `gemma_core.finetune` (its torch, jax or tensorflow trainer);
transformers + PEFT runs `get_peft_model` with the same adapter init (our A, B = 0) and
`torch.optim.AdamW`, the loss transformers computes. Tokens/s counts the real tokens of the timed
steps (the first step, which compiles/warms up, is timed apart); the loss columns show the curve.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from decode import _peak_mb  # this process's peak resident memory (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("transformers+peft", "torch", "jax", "tensorflow")


def _setup(model: str) -> tuple[Any, list[Any]]:
    """(the gemma_core Model on numpy, the training examples)."""
    import gemma_core
    from gemma_core.data import read_examples

    base = gemma_core.load(model)
    if base.tokenizer is None:
        raise SystemExit(f"{model}: needs a tokenizer")
    return base, read_examples(ROOT / "tests" / "data" / "quality.txt", base.tokenizer)


def _cfg(args: argparse.Namespace) -> Any:
    from gemma_core.finetune import TrainConfig
    from gemma_core.lora import LoraConfig

    # the text is ~2k tokens: epochs enough for the steps asked (max_steps ends the run)
    return TrainConfig(lora=LoraConfig(r=8, alpha=16), lr=2e-4, batch_size=args.batch_size,
                       seq_len=args.seq_len, max_steps=args.steps, seed=0, epochs=args.steps)


def _ours(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    from gemma_core.finetune import finetune

    model, examples = _setup(args.model)
    times: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, total: int, loss: float, rate: float) -> None:
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(args)
        last[0] = time.perf_counter()
        result = finetune(model, examples, Path(tmp) / "out", cfg, backend=engine, progress=progress)
    per_step = cfg.batch_size * cfg.seq_len  # packed rows: every token is real
    return {"engine": engine, "losses": result.losses, "first_s": times[0],
            "tok_s": per_step * (len(times) - 1) / sum(times[1:]) if len(times) > 1 else float("nan"),
            "peak_mb": _peak_mb()}


def _peft(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import peft
    import torch
    import transformers

    from gemma_core.data import Batches
    from gemma_core.lora import init_lora_weights
    from gemma_core.weights import canonical_weights

    model, examples = _setup(args.model)
    cfg = _cfg(args)
    hf_config = transformers.AutoConfig.for_model(**model.config.to_hf())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    state = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in canonical_weights(model).items()}
    hf.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    lora = peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                           target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    tuned = peft.get_peft_model(hf, lora)
    ours = init_lora_weights(model.config, cfg.lora, cfg.seed)
    with torch.no_grad():  # the same init as gemma-core's (PEFT's own draws differ by RNG)
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                p.copy_(torch.from_numpy(ours[key]))
    tuned.train()
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    batches = iter(Batches(examples, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                           epochs=cfg.epochs, pad_id=model.config.pad_token_id))
    losses, times = [], []
    for _ in range(cfg.max_steps):
        b = next(batches)
        t0 = time.perf_counter()
        mask = torch.from_numpy(b.mask.astype(np.int64))
        out = tuned(input_ids=torch.from_numpy(b.ids), attention_mask=mask, labels=torch.from_numpy(b.labels))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        times.append(time.perf_counter() - t0)
    per_step = cfg.batch_size * cfg.seq_len
    return {"engine": "transformers+peft", "losses": losses, "first_s": times[0],
            "tok_s": per_step * (len(times) - 1) / sum(times[1:]), "peak_mb": _peak_mb()}


def table(rows: list[dict[str, Any]], title: str) -> str:
    ref = next((r for r in rows if r["engine"] == "transformers+peft" and "tok_s" in r), None)
    lines = [f"# LoRA fine-tuning, {title}", "",
             "| engine | tokens/s | vs transformers+PEFT | first step s | peak MB | loss: first, last |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | error: {r['error']} | | | | |")
            continue
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        lines.append(f"| {r['engine']} | {r['tok_s']:.0f} | {ratio} | {r['first_s']:.1f} | "
                     f"{r['peak_mb']:.0f} | {r['losses'][0]:.4f}, {r['losses'][-1]:.4f} |")
    lines += ["", "Loss curves (every step):", ""]
    lines += [f"- {r['engine']}: {', '.join(f'{x:.4f}' for x in r['losses'])}" for r in rows if "losses" in r]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded' (real 270M), a preset or a path")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", help="write the Markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        row = _peft(args) if args.worker == "transformers+peft" else _ours(args.worker, args)
        print(json.dumps(row))
        return 0
    rows = []
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--worker", engine, "--model", args.model, "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
            if proc.returncode:
                raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row = {"engine": engine, "error": str(e)[:200]}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    title = (f"{args.model}, float32, rank 8 on q/k/v/o, batch {args.batch_size} x {args.seq_len} "
             f"packed tokens, {args.steps} steps, CPU")
    text = table(rows, title)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
