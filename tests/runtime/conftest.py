"""Shared fixtures of the runtime tests: a tiny random Llama saved to disk, with its greedy outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.models import save_tiny_llama

VOCAB = 97
N_NEW = 20
MIN_MARGIN = 1e-3  # top-1 minus top-2 logit: tree attention moves logits by ~1e-4, closer calls are float luck
REL_TOL = 1e-4  # float32 kernels differ between CPU models (AMD, Intel) in the 4th significant digit


@dataclass(frozen=True)
class Tiny:
    folder: Path
    prompts: list[list[int]]
    outputs: list[list[int]]  # greedy, N_NEW tokens each, no EOS
    vocab: int = VOCAB
    n_new: int = N_NEW


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """A saved tiny Llama, two prompts, and the target's greedy outputs for them."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = save_tiny_llama(folder, vocab_size=VOCAB)
    prompts = [np.random.default_rng(i).integers(0, VOCAB, 12).tolist() for i in range(2)]
    return Tiny(folder, prompts, [greedy_reference(model, p, N_NEW) for p in prompts])


def greedy_reference(model, prompt: list[int], n_new: int) -> list[int]:
    """`generate(do_sample=False)`'s n_new tokens after `prompt` (EOS ignored), after checking the
    precondition of every equality test: no near-tie between the target's top two logits."""
    with torch.inference_mode():
        full = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0].tolist()  # fmt: skip
        logits = model(torch.tensor([full])).logits[0, len(prompt) - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    assert margin > MIN_MARGIN, f"precondition: the target nearly ties after {prompt[-8:]} (margin {margin:.1e})"
    return full[len(prompt) :]


@pytest.fixture(scope="session")
def greedy():
    """`greedy_reference`, for test modules (which cannot import this conftest)."""
    return greedy_reference




def scaled_tolerance(expected) -> float:
    """Tolerance for comparing float32 results with `expected`: relative to its largest magnitude.

    Kernels differ between CPU models (summation order, FMA, vector width), so two correct
    computations of logits of magnitude ~40 differ by ~1e-3: a bare atol would pass on one machine
    and fail on the next. The tolerance scales with the values, never below REL_TOL itself.
    """
    return REL_TOL * max(1.0, float(np.abs(np.asarray(expected, dtype=np.float64)).max()))


class Close:
    """`close(actual, expected, what)` asserts elementwise equality within `close.tolerance(expected)`."""

    tolerance = staticmethod(scaled_tolerance)

    def __call__(self, actual, expected, what: str = "") -> None:
        a, e = (np.asarray(x.detach() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
                for x in (actual, expected))  # fmt: skip
        assert a.shape == e.shape, (what, a.shape, e.shape)
        diff = float(np.abs(a - e).max()) if a.size else 0.0
        assert diff <= scaled_tolerance(e), f"{what}: max |diff| {diff:.2e} > {scaled_tolerance(e):.2e}"


@pytest.fixture(scope="session")
def close() -> Close:
    """Float comparison sized to the values compared, for test modules (which cannot import this conftest)."""
    return Close()
