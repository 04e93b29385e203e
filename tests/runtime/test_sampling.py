"""T > 0 through real processes: the runtime's samples follow the target's distribution.

The core's own tests prove the verifier (`verify_sampled` is exact for any draft); this one proves
the wiring around it on stage processes over ZeroMQ: the target's probabilities that reach D0, the
temperature applied to them, the random generator. One prompt is answered many times, two tokens
each, by flowspec with a scripted drafter (so drafts are accepted and rejected); the empirical
distributions of the first token and of the second are compared with the exact ones computed from
the target itself, and with the distributions a runtime that ignored the temperature would give.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowspec.config import Policy, scenario_from_dict
from flowspec.synthetic import ReferenceDrafter
from flowspec.workload import one_after_another
from runtime.launcher import Cluster, Target, stage_scenario
from runtime.models import load_model

pytestmark = pytest.mark.runtime

N_SAMPLES = 400
TEMPERATURE = 0.5


def total_variation(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def exact(model, prompt: list[int], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """P(t1) and P(t2) = sum over t1 of P(t1) P(t2 | t1), at `temperature`."""
    with torch.inference_mode():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        vocab = first.shape[0]
        batch = torch.tensor([prompt + [t] for t in range(vocab)])
        second = torch.softmax(model(batch).logits[:, -1].double() / temperature, -1)  # [V, V]: row t1
    return first.numpy(), (first[:, None] * second).sum(0).numpy()


def test_sampled_tokens_follow_the_target_at_its_temperature(tiny) -> None:
    prompt = tiny.prompts[0]
    target = Target.load(scenario_from_dict({
        "seed": 7,
        "pipeline": {"n_stages": 3},
        "decoding": {"max_new_tokens": 2, "temperature": TEMPERATURE},
        "tree": {"total": 10, "topk": 3, "depth": 3, "segment_size": 4},
        "expansion": {"total": 6, "topk": 3, "depth": 2},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 20},
    }))  # fmt: skip
    model = load_model(tiny.folder)
    p1, p2 = exact(model, prompt, TEMPERATURE)
    q1, q2 = exact(model, prompt, 1.0)  # what dropping the temperature would sample from
    assert 0.5 * np.abs(p1 - q1).sum() > 0.25 and 0.5 * np.abs(p2 - q2).sum() > 0.25  # precondition: T matters
    drafter = ReferenceDrafter([prompt + tiny.outputs[0]], [0], tiny.vocab)  # drafts the greedy answer
    with Cluster(stage_scenario(target.scenario, Policy.FLOWSPEC), target) as cluster:
        result = cluster.serve(stage_scenario(target.scenario, Policy.FLOWSPEC), drafter,
                               one_after_another([prompt] * N_SAMPLES))  # fmt: skip
    outputs = np.array([result.outputs[i] for i in range(N_SAMPLES)])  # [N, 2]
    c1 = np.bincount(outputs[:, 0], minlength=tiny.vocab)
    c2 = np.bincount(outputs[:, 1], minlength=tiny.vocab)
    # With N = 400 the expected total variation of a correct sampler is below 0.1 here; the bound
    # leaves room for noise, and stays well below the distance to the untempered distributions.
    assert total_variation(c1, p1) < 0.12 and total_variation(c2, p2) < 0.12, (total_variation(c1, p1),
                                                                               total_variation(c2, p2))  # fmt: skip
    assert total_variation(c1, q1) > 0.18 and total_variation(c2, q2) > 0.18
    steps = result.frames()["steps"]
    assert steps.n_accepted.max() >= 2  # some drafts were accepted, so the verifier's path ran too
