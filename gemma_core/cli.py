"""The `gemma` command line: graph, info, conformance (and generation as it lands)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gemma_core.config import GemmaConfig
from gemma_core.errors import GemmaError


def _config_arg(value: str) -> GemmaConfig:
    """A preset name, a model folder, or a config.json path."""
    from gemma_core.checkpoint import read_config
    from gemma_core.presets import PRESETS, get_preset

    if value in PRESETS and not os.path.exists(value):
        return get_preset(value)
    path = Path(value)
    if path.exists():
        return read_config(path if path.is_dir() else path.parent)
    return get_preset(value)


def cmd_graph(args: argparse.Namespace) -> int:
    from gemma_core.graph import format_graph
    from gemma_core.layout import format_layout

    config = _config_arg(args.config)
    print(format_graph(config))
    if args.weights:
        print("\n# weight layout")
        print(format_layout(config))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gemma_core.layout import param_count

    config = _config_arg(args.model)
    hf = config.to_hf()
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
    return 0


def _format_matrix(results: Sequence[object]) -> str:
    lines = [f"{'case':<38} {'backend':<10} {'dtype':<9} {'status':<5} detail"]
    for r in results:
        lines.append(f"{r.case:<38} {r.backend:<10} {r.dtype:<9} {r.status:<5} {r.detail}")  # type: ignore[attr-defined]
    return "\n".join(lines)


def cmd_conformance(args: argparse.Namespace) -> int:
    from conformance.runner import run_conformance

    backends = args.backends.split(",") if args.backends else None
    dtypes = args.dtypes.split(",")
    cases = args.cases.split(",") if args.cases else None
    results = run_conformance(backends, dtypes, cases)
    failed = [r for r in results if r.status == "fail"]
    if args.json:
        print(json.dumps({"results": [r.as_dict() for r in results], "failed": len(failed)}, indent=2))
    else:
        print(_format_matrix(results))
        counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
        print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma", description="Gemma 1/2/3 on any backend.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("graph", help="print a config's op list")
    p.add_argument("--config", required=True, help="preset name, model folder or config.json")
    p.add_argument("--weights", action="store_true", help="also print the weight layout table")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("info", help="config and parameter count of a preset or model folder")
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("conformance", help="compare backends with the NumPy reference")
    p.add_argument("--backends", help="comma-separated (default: every known backend; "
                                      "ones not installed are skipped)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_conformance)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (GemmaError, OSError) as e:
        if args.debug:
            raise
        print(f"gemma: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
