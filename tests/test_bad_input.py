"""Bad scenarios are input errors: every mutation of a shipped scenario either loads, and then
`simulate` reads it as `check` did, or fails with an error naming the file and the key, exit 2,
never another exception."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import main
from flowspec.config import ScenarioError, scenario_from_dict, scenario_to_dict

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
BASE = scenario_to_dict(scenario_from_dict(yaml.safe_load((SCENARIOS / "sparse-edge.yaml").read_text())))


def leaf_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in leaf_paths(v, (*prefix, k))] or [prefix]
    return [prefix]


PATHS = [p for p in leaf_paths(BASE) if p]
ODD_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**64, 1e9, 1e-300, "", "../..", "x/y", "fast", True, False, None, [], {}, [1],
                     {"a": 1}, "1e9", "flowspec", "sparse-edge.yaml", "\x00"]),
    st.text(max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), ODD_VALUES), min_size=1, max_size=3))
def test_a_mutated_scenario_loads_or_names_the_key(mutations, tmp_path_factory) -> None:
    data = copy.deepcopy(BASE)
    for path, value in mutations:
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key), dict) else node
        node[path[-1]] = value
    folder = tmp_path_factory.mktemp("bad")
    for name in ("trace.csv",):  # a trace the mutation may point at, so `arrivals: trace` can load
        (folder / name).write_text("t_arrival_s,prompt_tokens,max_new_tokens\n0.0,16,8\n")
    path = folder / "mutated.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check", str(path)])
    if result.exit_code == 0:
        return  # valid: `check` built everything `simulate` builds
    assert result.exit_code == 2, (mutations, result.output, repr(result.exception))
    message = result.stderr.strip()
    # a scenario error names the scenario file; a profile the scenario names, its key and the profile's file
    named = message.startswith(f"error: {path}") or re.match(r"error: (devices|acceptance|network)[\w.]* = '", message)
    assert named and "Traceback" not in result.output, (mutations, message)


@pytest.mark.parametrize(("override", "message"), [
    ("network.bandwidth_mbps=.inf", "network.bandwidth_mbps must be a finite number, got inf"),
    ("network.latency_ms=.inf", "network.latency_ms must be a finite number, got inf"),
    ("decoding.temperature=.inf", "decoding.temperature must be a finite number, got inf"),
    ("tree.topk=100000", "tree.topk must be <= model.vocab_size = 32000 (children of one node), got 100000"),
    ("model.vocab_size=1", "model.vocab_size must be >= 2, got 1"),
    ("seed=18446744073709551616", "seed must be <= 9223372036854775807 (torch seeds are signed 64-bit)"),
    ("workload.n_requests=1000000000", "workload.n_requests must be <= 100000 (every request's records are kept"),
    ("name=../x", "name must be a plain folder name (no '/', '\\', '..' alone), got '../x'"),
])
def test_what_check_once_let_through_is_refused_by_name(override: str, message: str) -> None:
    """Each of these passed `check` and then ended `simulate` in a traceback, or wrote outside runs/."""
    result = CliRunner().invoke(main, ["check", str(SCENARIOS / "sparse-edge.yaml"), "--set", override])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_scenario_errors_are_scenario_errors() -> None:
    with pytest.raises(ScenarioError, match=r"x.yaml: workload.prompt_tokens must be <= 1000000"):
        scenario_from_dict({**BASE, "workload": {**BASE["workload"], "prompt_tokens": 10**7}}, "x.yaml")
