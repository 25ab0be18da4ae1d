"""Float32 logit gaps on the real Gemma 3 270M: every backend against transformers on the same GGUF.

    python benchmarks/precision.py [--out benchmarks/results-precision.md]

For each backend and prompt: the largest absolute gap of the first-step logits, that gap over the
largest |logit| (relative) and over the logits' standard deviation (the bound
tests/test_real_weights.py holds: 1e-4). Needs transformers, torch and accelerate (the peer).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gemma_core
from gemma_core.embedded import default_model_path

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "La capitale de l'Allemagne est",
           "東京は日本の", "1, 2, 3, 5, 8, 13,"]


def main() -> None:
    import torch
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    args = parser.parse_args()
    path = default_model_path()
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    rows = ["| backend | prompt tokens | max abs gap | gap / max abs logit | gap / logit std |",
            "|---|---|---|---|---|"]
    for backend in gemma_core.installed_backends():
        model = gemma_core.load(path, backend=backend)
        gaps, rel, per_std, lengths = [], [], [], []
        for prompt in PROMPTS:
            ids = np.array([model.tokenizer.encode(prompt)])
            with torch.no_grad():
                ref = hf(torch.from_numpy(ids)).logits.numpy().astype(np.float64)
            got = model.to_numpy(model.forward(ids).logits).astype(np.float64)
            gap = float(np.abs(got - ref).max())
            gaps.append(gap)
            rel.append(gap / float(np.abs(ref).max()))
            per_std.append(gap / float(ref.std()))
            lengths.append(ids.shape[1])
        rows.append(f"| {backend} | {min(lengths)}-{max(lengths)} | {min(gaps):.2e} - {max(gaps):.2e} | "
                    f"{min(rel):.1e} - {max(rel):.1e} | {min(per_std):.1e} - {max(per_std):.1e} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(
            "# Float32 logits on the real Gemma 3 270M against transformers\n\n"
            "`python benchmarks/precision.py --out benchmarks/results-precision.md`: first-step "
            f"logits of {len(PROMPTS)} prompts, transformers {transformers.__version__} float32 eager "
            "on the same GGUF (dequantised by gguf-py in both).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
