"""Int8 draft weights: close to fp32, and a shortlisted LM head that returns the exact top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from runtime import quantized
from runtime.drafters import TopK

pytestmark = pytest.mark.skipif(not quantized.available(), reason="int8 kernels need an x86 CPU (fbgemm)")


def test_int8_linear_stays_within_a_percent_of_fp32_and_leaves_the_original_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 32, bias=False))
    x = torch.randn(10, 64)
    q = quantized.int8_copy(model)
    assert isinstance(q[0], quantized.Int8Linear) and isinstance(model[0], nn.Linear)
    with torch.inference_mode():
        exact, approx = model(x), q(x)
        assert approx.shape == (10, 32)
        assert float((approx - exact).abs().max() / exact.abs().max()) < 0.02
        assert q(x[None]).shape == (1, 10, 32)  # leading dimensions pass through


def test_shortlisted_head_returns_the_exact_top_k_and_log_probs():
    """An LM head whose logits have a clear top (as a trained head's do): the int8 shortlist finds
    every true top-k token, and their log-probs match one exact fp32 pass to 1e-3."""
    torch.manual_seed(1)
    vocab, hidden = 8192, 64
    head = torch.randn(vocab, hidden) * 0.05
    h = torch.randn(6, hidden)
    favourites = torch.randint(0, vocab, (6, 12))
    for row in range(6):  # a dozen strong candidates per row, as after training
        head[favourites[row]] += 0.3 * h[row] / h[row].norm() * torch.linspace(1, 3, 12)[:, None]
    exact = torch.log_softmax(h @ head.T, dim=-1).topk(10, dim=-1)
    tokens, logp = TopK(head, int8=True)(h, 10)
    assert TopK(head, int8=True).packed is not None and TopK(head).packed is None
    assert tokens.tolist() == exact.indices.tolist()
    np.testing.assert_allclose(logp, exact.values.double().numpy(), atol=1e-3)


def test_small_heads_take_the_exact_pass():
    head = torch.randn(256, 16)
    assert TopK(head, int8=True).packed is None
    tokens, _ = TopK(head, int8=True)(torch.randn(3, 16), 4)
    assert tokens.shape == (3, 4)
