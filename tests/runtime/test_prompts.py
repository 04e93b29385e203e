"""Prompts a run refuses before any process starts: token ids outside the vocabulary, requests
longer than the model's context, files that are not prompts. Each is exit 2 naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main

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
