"""Prompts for runtime runs: built-in ones, `--prompt TEXT`, or a JSONL file; chat templates applied.

A JSONL line is an object with one of: `prompt` (text), `messages` or `input` (a list of
{"role", "content"} chat messages, the layout of OpenAI evals' sets), `turns` (MT-Bench's layout:
the first turn is the prompt), or `tokens` (token ids, for models without a tokenizer); `max_new_tokens` optionally overrides the scenario per request.
Errors name the file, the line and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowspec.config import Scenario, ScenarioError
from flowspec.workload import Request, json_lines, with_prompts

Prompt = tuple[tuple[int, ...], int | None]  # token ids, max_new_tokens (None: the scenario's)

# Written for this project (no dataset needed on a fresh machine): short instructions of the kinds
# the paper's sets cover — chat, code, maths, summary, question answering, translation.
BUILTIN_PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that returns the factorial of n.",
    "Give three tips for staying healthy.",
    "Explain in two sentences why the sky is blue.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "A train travels 120 km in 1.5 hours. What is its average speed? Show your steps.",
    "List the planets of the solar system in order from the Sun.",
    "Write a haiku about the sea.",
)


def encode(tokenizer: Any, item: str | list[dict[str, str]]) -> tuple[int, ...]:
    """Token ids of a text or chat; instruct models get their chat template with the assistant cue."""
    messages = [{"role": "user", "content": item}] if isinstance(item, str) else item
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return tuple(int(t) for t in ids)
    text = "\n".join(m["content"] for m in messages)
    return tuple(int(t) for t in tokenizer(text)["input_ids"])


def requests_for(scenario: Scenario, tokenizer: Any, *, prompt: str | None = None,
                 prompts_file: Path | None = None, base_dir: Path | None = None) -> list[Request]:  # fmt: skip
    """The run's requests: `prompt`, else the file's, else the built-in prompts (workload.n_requests
    of them; random token prompts of workload.prompt_tokens without a tokenizer), arriving as the
    scenario's workload says — the same arrival times the simulator draws (`flowspec.workload`)."""
    requests = with_prompts(scenario, prompts_for(scenario, tokenizer, prompt=prompt, prompts_file=prompts_file), base_dir)
    source = prompts_file or ("--prompt" if prompt is not None else "the built-in prompts")
    check_requests(requests, scenario, str(source))
    return requests


def check_requests(requests: list[Request], scenario: Scenario, source: str) -> None:
    """Every token id is in the model's vocabulary and every request fits its context: past it,
    positions have no meaning the model learned, and a stage would compute nonsense silently."""
    vocab, context = scenario.model.vocab_size, scenario.model.context_tokens
    for r in requests:
        where = f"{source}: request {r.request_id}"
        if max(r.prompt) >= vocab:
            raise ScenarioError(f"{where}: token id {max(r.prompt)} is outside the model's vocabulary of {vocab}")
        n_new = r.max_new_tokens or scenario.decoding.max_new_tokens
        if context and len(r.prompt) + n_new > context:
            raise ScenarioError(f"{where}: {len(r.prompt)} prompt tokens + {n_new} new ones exceed the model's "
                                f"context of {context} positions (shorten the prompt or lower max_new_tokens)")  # fmt: skip


def prompts_for(scenario: Scenario, tokenizer: Any, *, prompt: str | None = None,
                prompts_file: Path | None = None) -> list[Prompt]:  # fmt: skip
    if prompt is not None:
        if tokenizer is None:
            raise ScenarioError("--prompt needs a model with a tokenizer (use --prompts with token ids)")
        return [(encode(tokenizer, prompt), None)]
    if prompts_file is not None:
        return read_jsonl(prompts_file, tokenizer)
    n = scenario.workload.n_requests
    if tokenizer is None:
        rng = np.random.default_rng(scenario.seed)
        vocab = scenario.model.vocab_size
        return [(tuple(rng.integers(0, vocab, scenario.workload.prompt_tokens).tolist()), None) for _ in range(n)]
    return [(encode(tokenizer, BUILTIN_PROMPTS[i % len(BUILTIN_PROMPTS)]), None) for i in range(n)]


def read_jsonl(path: Path, tokenizer: Any) -> list[Prompt]:
    """(token ids, max_new_tokens or None) per line of a JSONL prompts file."""
    out = []
    for where, row in json_lines(path, ScenarioError):
        max_new = row.get("max_new_tokens")
        if max_new is not None and (not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1):
            raise ScenarioError(f"{where}: max_new_tokens must be an integer >= 1, got {max_new!r}")
        if "tokens" in row:
            tokens = row["tokens"]
            # JSON true/false are not token ids, though Python's bool is an int
            if not (isinstance(tokens, list) and tokens and all(type(t) is int and t >= 0 for t in tokens)):
                raise ScenarioError(f"{where}: tokens must be a non-empty list of token ids")
            out.append((tuple(tokens), max_new))
            continue
        item = row.get("prompt", row.get("messages", row.get("input")))
        turns = row.get("turns")
        if item is None and isinstance(turns, list) and turns and isinstance(turns[0], str):
            item = turns[0]  # MT-Bench's layout: the first turn opens the conversation
        if isinstance(item, str) and item:
            pass
        elif isinstance(item, list) and item and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     and isinstance(m.get("role"), str) for m in item):  # fmt: skip
            pass
        else:
            raise ScenarioError(f"{where}: needs prompt (text), messages/input (chat messages), turns or tokens")
        if tokenizer is None:
            raise ScenarioError(f"{where}: text prompts need a model with a tokenizer (give tokens instead)")
        out.append((encode(tokenizer, item), max_new))
    if not out:
        raise ScenarioError(f"{path}: no prompts")
    return out
