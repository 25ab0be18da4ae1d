"""`gemma finetune`: train a LoRA adapter on a .jsonl or .txt file (gemma_core.finetune)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any

from gemma_core.errors import GemmaError


def _data_id(path: str) -> str:
    """The data file's name and content hash: a resume on other data is refused."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise GemmaError(f"--data: cannot read {path}: {e.strerror}") from None
    return f"{os.path.basename(path)}:sha256:{digest.hexdigest()[:16]}"


def cmd_finetune(args: argparse.Namespace) -> int:
    import gemma_core
    from gemma_core.data import read_examples
    from gemma_core.embedded import default_model_path
    from gemma_core.finetune import TrainConfig, finetune
    from gemma_core.lora import DEFAULT_TARGETS, LoraConfig
    from gemma_core.quant import MODULE_ROLES
    from gemma_core.tokenizer import GemmaTokenizer

    modules = (tuple(MODULE_ROLES) if args.target_modules == "all-linear"
               else tuple(m for m in (args.target_modules or ",".join(DEFAULT_TARGETS)).split(",") if m))
    cfg = TrainConfig(
        lora=LoraConfig(r=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                        target_modules=modules, dropout=args.lora_dropout),
        lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.batch_size,
        seq_len=args.seq_len, grad_accum=args.grad_accum, pack=not args.no_pack, seed=args.seed,
        max_steps=args.max_steps, save_every=args.save_every, lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio)
    data_id = _data_id(args.data)
    path = args.model or default_model_path()
    # the weights are read once on the host; the trainer holds them in its own framework
    quantize = None
    if args.quantize:  # QLoRA: the adapter over quantised base weights (every trainer)
        from gemma_core.quant import parse_scheme

        quantize = parse_scheme(args.quantize, args.group_size)
    model = gemma_core.load(path, dtype=args.dtype, quantize=quantize)
    if args.tokenizer:
        model.tokenizer = GemmaTokenizer(args.tokenizer)
    if model.tokenizer is None:
        raise GemmaError(f"{path}: the model has no tokenizer; pass --tokenizer tokenizer.model")
    examples = read_examples(args.data, model.tokenizer)
    evals = read_examples(args.eval_data, model.tokenizer) if args.eval_data else ()
    result = finetune(model, examples, args.out, cfg, backend=args.backend, eval_examples=evals,
                      resume=args.resume, data_id=data_id)
    tail = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    print(f"{args.out}: LoRA adapter (r={cfg.lora.r}) after {result.steps} steps, loss "
          f"{result.losses[-1]:.4f}{tail}, {result.tokens_per_second:,.0f} tok/s; "
          f"run it with: gemma generate --adapter {args.out}", file=sys.stderr)
    return 0


def add_finetune_parser(sub: Any, positive_int: Any) -> None:
    """The `finetune` subcommand on the CLI's subparsers."""
    from gemma_core.finetune import LR_SCHEDULERS, TRAINABLE_BACKENDS

    p = sub.add_parser("finetune", help="train a LoRA adapter (PEFT format) on a .jsonl or .txt file")
    p.add_argument("--model", help="base checkpoint in any format (default: embedded)")
    p.add_argument("--tokenizer", help="a tokenizer.model file (for models that lack one)")
    p.add_argument("--data", required=True, help=".jsonl (text, messages or prompt/completion per line) "
                                                 "or .txt (documents separated by blank lines)")
    p.add_argument("--eval-data", help="a file of the same kinds for the eval loss at the end")
    p.add_argument("--out", required=True, help="folder for the adapter and its checkpoints")
    p.add_argument("--backend", default="torch", choices=TRAINABLE_BACKENDS, help="framework that trains")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--quantize", choices=("int8", "int4", "int4-mixed", "nf4"),
                   help="QLoRA: train the adapter over these quantised base weights")
    p.add_argument("--group-size", type=positive_int, help="int4/nf4 group size (default 32)")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="adapter rank r")
    p.add_argument("--lora-alpha", type=float, help="adapter alpha (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout of the adapter's input")
    p.add_argument("--target-modules", help="comma-separated projections, or all-linear "
                                            "(default: q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--epochs", type=positive_int, default=1, help="passes over the data")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--lr-scheduler", default="constant", choices=LR_SCHEDULERS,
                   help="learning-rate schedule, as transformers' lr_scheduler_type (default: constant)")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear warmup from 0 to --lr")
    p.add_argument("--warmup-ratio", type=float, default=0.0,
                   help="warmup as a fraction of the run's steps (rounded up; instead of --warmup-steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--batch-size", type=positive_int, default=4, help="rows per micro-batch")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per row")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step")
    p.add_argument("--no-pack", action="store_true", help="one example a row, right-padded "
                                                          "(default: examples packed into full rows)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's init and the data order")
    p.add_argument("--save-every", type=positive_int, help="write a checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=cmd_finetune)
