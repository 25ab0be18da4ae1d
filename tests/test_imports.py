"""`gemma_core` (and the reference backend and conformance runner) import no framework."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("torch", "jax", "tensorflow", "keras", "transformers", "flax")


def test_core_imports_no_framework() -> None:
    code = (
        "import sys, gemma_core, gemma_core.cli, gemma_core.checkpoint, conformance, backends.numpy\n"
        "import numpy as np\n"
        "gemma_core.load('tiny-gemma').forward(np.array([[2, 3]]))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
