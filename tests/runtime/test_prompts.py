"""Prompts a run refuses before any process starts: token ids outside the vocabulary, requests
longer than the model's context, files that are not prompts. Each is exit 2 naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import main
from flowspec.config import ScenarioError
from runtime.prompts import read_jsonl

TINY_YAML = str(Path(__file__).parents[2] / "scenarios" / "tiny.yaml")


def run_with(tiny, tmp_path: Path, lines: list[str] | bytes, *extra: str):
    prompts = tmp_path / "prompts.jsonl"
    if isinstance(lines, bytes):
        prompts.write_bytes(lines)
    else:
        prompts.write_text("\n".join(lines) + "\n")
    args = ["run", TINY_YAML, "--set", f"runtime.model={tiny.folder}", "--prompts", str(prompts),
            "--out", str(tmp_path / "out"), "--no-plots", *extra]  # fmt: skip
    return CliRunner().invoke(main, args), prompts


@pytest.mark.parametrize(("lines", "extra", "message"), [
    ([json.dumps({"tokens": [1, 2, 97]})], (), "request 0: token id 97 is outside the model's vocabulary of 97"),
    ([json.dumps({"tokens": [1] * 250})], (),
     "request 0: 250 prompt tokens + 48 new ones exceed the model's context of 256 positions"),
    ([json.dumps({"tokens": [1, 2]}), json.dumps({"tokens": [3], "max_new_tokens": 256})], (),
     "request 1: 1 prompt tokens + 256 new ones exceed the model's context of 256 positions"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", (), "not UTF-8 text"),
    (["{not json"], (), ":1: not JSON"),
])
def test_a_bad_prompts_file_is_refused_by_name_before_any_stage_starts(tiny, tmp_path, lines, extra, message) -> None:
    result, prompts = run_with(tiny, tmp_path, lines, *extra)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {prompts}") and message in result.stderr
    assert "starting" not in result.stderr  # refused before the cluster


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True), st.text(max_size=6),
                   st.lists(st.one_of(st.integers(-3, 200), st.booleans()), max_size=4), st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                                                       st.text(max_size=4)), max_size=2))  # fmt: skip
ROWS = st.dictionaries(st.sampled_from(["prompt", "messages", "input", "turns", "tokens", "max_new_tokens", "x"]), VALUES,
                       max_size=3)  # fmt: skip
LINES = st.lists(st.one_of(ROWS.map(json.dumps), st.text(max_size=12), st.just("[1, 2]"), st.just("")), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=LINES, tail=st.binary(max_size=6))
def test_a_generated_prompts_file_is_read_or_refused_by_file_and_line(tmp_path, lines, tail) -> None:
    """Whatever a prompts file holds, reading it gives prompts or an input error that starts with
    the file (and the line, for a line that is wrong), never another exception."""
    path = tmp_path / "generated.jsonl"
    path.write_bytes("\n".join(lines).encode() + tail)
    try:
        prompts = read_jsonl(path, None)
    except ScenarioError as e:
        assert str(e).startswith(f"{path}:"), str(e)
        return
    assert prompts and all(tokens and all(type(t) is int and t >= 0 for t in tokens) for tokens, _ in prompts)
