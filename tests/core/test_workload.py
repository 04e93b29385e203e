"""One workload in both backends: the same YAML gives the same requests and arrival times whether
the simulator draws synthetic prompts or the runtime brings real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowspec.config import ScenarioError, scenario_from_dict
from flowspec.workload import Request, build_workload, one_after_another, read_trace, with_prompts

PROMPTS = [((5, 6, 7), None), ((8, 9), 3), ((1,), None)]


def scenario(**workload):
    return scenario_from_dict({"seed": 3, "decoding": {"max_new_tokens": 10}, "workload": workload})


def test_poisson_arrivals_are_the_same_in_both_backends() -> None:
    sc = scenario(arrivals="poisson", n_requests=3, rate_per_s=2.0, prompt_tokens=4)
    simulated = [r.t_arrival_s for r in build_workload(sc)]
    served = with_prompts(sc, PROMPTS)
    assert [r.t_arrival_s for r in served] == simulated
    assert simulated == sorted(simulated) and simulated[0] > 0
    assert [r.prompt for r in served] == [p for p, _ in PROMPTS]
    assert [r.max_new_tokens for r in served] == [10, 3, 10]  # a prompt's own length of output wins


def test_more_prompts_than_requests_draw_more_arrivals_the_same_way() -> None:
    """The first n_requests arrivals do not depend on how many prompts there are."""
    sc = scenario(arrivals="poisson", n_requests=2, rate_per_s=2.0)
    two = [r.t_arrival_s for r in build_workload(sc)]
    three = [r.t_arrival_s for r in with_prompts(sc, PROMPTS)]
    assert three[:2] == two and len(three) == 3 and three[2] > three[1]


def test_single_arrivals_are_a_closed_loop() -> None:
    sc = scenario(arrivals="single", n_requests=2)
    assert [r.t_arrival_s for r in with_prompts(sc, PROMPTS)] == [0.0, None, None]
    assert [r.t_arrival_s for r in build_workload(sc)] == [0.0, None]
    assert one_after_another([[1, 2], [3]]) == [Request(0, 0.0, (1, 2), None), Request(1, None, (3,), None)]


def test_a_trace_sets_arrivals_and_lengths_in_both(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("t_arrival_s,prompt_tokens,max_new_tokens\n0.0,4,8\n0.5,2,3\n1.5,3,5\n")
    sc = scenario(arrivals="trace", trace=str(trace))
    simulated = build_workload(sc)
    assert [(r.t_arrival_s, len(r.prompt), r.max_new_tokens) for r in simulated] == [(0.0, 4, 8), (0.5, 2, 3), (1.5, 3, 5)]
    served = with_prompts(sc, PROMPTS[:2])  # real prompts cycle over the trace's rows
    assert [(r.t_arrival_s, r.prompt, r.max_new_tokens) for r in served] == [
        (0.0, (5, 6, 7), 8), (0.5, (8, 9), 3), (1.5, (5, 6, 7), 5)]


@pytest.mark.parametrize("text, message", [
    ("t_arrival_s,prompt_tokens,max_new_tokens\n0.0,4,8\n0.5,x,3\n", r"line 3: prompt_tokens must be a whole number >= 1, got x"),
    ("t_arrival_s,prompt_tokens,max_new_tokens\n1.0,4,8\n0.5,4,3\n", r"line 3: t_arrival_s must not decrease"),
    ("t_arrival_s,prompt_tokens,max_new_tokens\n0.0,4,nan\n", r"line 2: max_new_tokens must be a whole number >= 1, got nan"),
    ("t_arrival_s,prompt_tokens\n0.0,4\n", r"missing column\(s\) max_new_tokens"),
    ("t_arrival_s,prompt_tokens,max_new_tokens\n", r"no requests"),
])  # fmt: skip
def test_a_bad_trace_names_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(text)
    with pytest.raises(ScenarioError, match=message):
        read_trace(trace)
