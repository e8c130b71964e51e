import math

import pytest
import torch

from faspx.errors import UsageError
from faspx.eval import perplexity
from tests.conftest import VOCAB, calib, tiny_model


@torch.no_grad()
def test_perplexity_is_exp_mean_window_loss():
    model = tiny_model("llama")
    ids = calib(1, 100).view(1, -1)
    losses = []
    for w in range(3):  # 100 tokens = 3 windows of 32, the tail is dropped
        x = ids[:, w * 32:(w + 1) * 32]
        logits = model(x).logits[0, :-1]
        losses.append(float(torch.nn.functional.cross_entropy(logits, x[0, 1:])))
    got = perplexity(model, ids, 32, progress=False)
    assert abs(got - math.exp(sum(losses) / 3)) < 1e-4 * got
    assert perplexity(model, ids, 32, max_windows=1, progress=False) == pytest.approx(math.exp(losses[0]), rel=1e-5)
    assert 1 < got < 4 * VOCAB


def test_too_little_text_for_one_window():
    with pytest.raises(UsageError, match="fewer than one window"):
        perplexity(tiny_model("opt"), torch.zeros(1, 10, dtype=torch.long), 32, progress=False)
