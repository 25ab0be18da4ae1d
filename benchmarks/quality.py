"""How far weight-only quantisation moves a model from float32, on the fixed text the tests use
(tests/data/quality.txt): top-1 agreement of next-token predictions and perplexity.

    python benchmarks/quality.py                          # the embedded Gemma 3 270M
    python benchmarks/quality.py --model path/to/hf-folder --out quality.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TEXT = Path(__file__).parent.parent / "tests" / "data" / "quality.txt"
SCHEMES = ("int8", "int4", "int4-mixed", "int4+v_proj=int8", "int4+down_proj=int8", "int4/64", "int4/128",
           "int4+int4-embedding", "nf4", "nf4+float-embedding")


def parse(spec: str):  # type: ignore[no-untyped-def]
    """`int4/64+int4-embedding+v_proj=int8` -> QuantConfig(int4, 64, embedding=int4,
    modules={v_proj: int8}); a recipe name (int4-mixed) as the scheme."""
    from gemma_core.quant import parse_scheme

    head, *extras = spec.split("+")
    scheme, _, group = head.partition("/")
    embedding = next((e.removesuffix("-embedding") for e in extras if e.endswith("-embedding")), "int8")
    modules = dict(e.split("=", 1) for e in extras if "=" in e)
    return parse_scheme(scheme, int(group) if group else None, embedding=embedding, modules=modules)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', a .gguf file or an HF folder")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", help="also write the markdown table to this file")
    args = parser.parse_args()

    import gemma_core
    from gemma_core.evaluate import compare, score
    from gemma_core.weights import quantize_model

    path = args.model
    if path == "embedded":
        from gemma_core.embedded import default_model_path

        path = default_model_path()
    host = gemma_core.load(path)  # float32 on the numpy backend: host arrays and the tokenizer
    if host.tokenizer is None:
        parser.error(f"{path}: no tokenizer beside the weights")
    config, weights = host.config, dict(host.weights)
    ids = host.tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    ref = score(gemma_core.Model(config, weights, backend=args.backend), ids, args.window)
    lines = [f"### {Path(path).name}: {len(ids)} tokens of tests/data/quality.txt, windows of "
             f"{args.window}, {args.backend} float32", "",
             "| weights | top-1 agreement with float32 | perplexity | change | quantise s |",
             "|---|---|---|---|---|",
             f"| float32 | 1.000 | {ref.perplexity:.3f} | - | - |"]
    for spec in args.schemes.split(","):
        t0 = time.perf_counter()
        qconfig, qweights = quantize_model(config, weights, parse(spec))
        seconds = time.perf_counter() - t0
        model = gemma_core.Model(qconfig, qweights, backend=args.backend)
        result = compare(ref, score(model, ids, args.window))
        lines.append(f"| {spec} | {result['top1_agreement']:.3f} | {result['perplexity']:.3f} | "
                     f"{result['perplexity_change']:+.1%} | {seconds:.1f} |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
