"""Measuring drafters offline: EAGLE-2 trees replayed over the target's own greedy answers.

Theory of operation
-------------------
At T = 0 a verification's outcome depends only on the tree and the target's greedy chain: the
target accepts the root's child that equals its next token, then that child's child, and so on,
and adds one token of its own (the bonus). So with the target's answer and its per-position argmax
in hand (`answers.Sample`: one teacher-forced pass), a drafter can be scored without a
pipeline: start at the first answer token as the root, grow a tree from the committed context,
count the accepted path, advance by accepted + 1, repeat to the end of the answer.

EAGLE heads read the target's features; they get them all up front through `observe` as prompt
rows, and read only positions before the root, as in the runtime. Each verification is a flat
row; `summarise` turns rows into the figures the issue and the card quote: mean accepted tokens
per verification (bonus included), the share of verifications reaching each depth, growth time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec.config import TreeConfig
from flowspec.tree import DraftTree, Drafter, grow


def accepted_length(tree: DraftTree, chain: np.ndarray) -> int:
    """Draft tokens the target accepts: the longest root path whose tokens equal `chain` (the
    target's greedy tokens after the root)."""
    node, accepted = 0, 0
    while accepted < len(chain):
        children = np.flatnonzero(tree.parents == node)
        match = children[tree.tokens[children] == chain[accepted]]
        if not len(match):
            break
        node, accepted = int(match[0]), accepted + 1
    return accepted


def replay(drafter: Drafter, sample, tree: TreeConfig, *, request_id: int = 0) -> list[dict]:
    """One row per verification over `sample`'s answer (see the module docstring)."""
    tokens = sample.tokens.numpy().astype(np.int64)
    chain = sample.next_tokens.numpy().astype(np.int64)
    n = len(tokens)
    if hasattr(drafter, "observe"):
        none = np.full(n, -1, dtype=np.int64)
        drafter.observe(request_id, none, none, tokens, np.arange(n), sample.features.float(), True)
    rows = []
    p = sample.n_prompt
    while p < n - 1:  # tokens[p] is the root; chain[p] is the target's token after it
        t0 = time.perf_counter()
        grown = grow(drafter, tokens[:p], int(tokens[p]), p, depth=tree.depth, topk=tree.topk, total=tree.total)
        grow_ms = (time.perf_counter() - t0) * 1e3
        accepted = accepted_length(grown, chain[p : n - 1])
        rows.append({"request": request_id, "position": p, "accepted": accepted, "tree_nodes": len(grown) - 1,
                     "grow_ms": grow_ms})  # fmt: skip
        p += accepted + 1
    return rows


def replay_all(drafter: Drafter, samples: list, tree: TreeConfig,
               progress: Callable[[int], None] = lambda n: None) -> pd.DataFrame:  # fmt: skip
    rows = []
    for i, sample in enumerate(samples):
        rows += [{**r, "prompt_set": sample.source} for r in replay(drafter, sample, tree, request_id=i)]
        progress(1)
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame, by: list[str], max_depth: int) -> pd.DataFrame:
    """Per group: verifications, mean accepted per verification (bonus included), the share of
    verifications accepting at least d draft tokens for d = 1..max_depth, median growth time."""

    def one(g: pd.DataFrame) -> pd.Series:
        out = {"verifications": len(g), "mean_accepted": (g["accepted"] + 1).mean()}
        out.update({f"reach_{d}": (g["accepted"] >= d).mean() for d in range(1, max_depth + 1)})
        out["grow_ms"] = g["grow_ms"].median()  # median: robust to a shared machine's hiccups
        return pd.Series(out)

    return frame.groupby(by, sort=False).apply(one, include_groups=False).reset_index()


def tree_card(frame: pd.DataFrame, tree: TreeConfig) -> dict:
    """The figures a head's card records."""
    row = summarise(frame.assign(all="all"), ["all"], tree.depth + 1).iloc[0]
    return {"tree": {"total": tree.total, "topk": tree.topk, "depth": tree.depth},
            "verifications": int(row["verifications"]), "mean_accepted_per_verification": round(float(row["mean_accepted"]), 3),
            "reach_depth": {d: round(float(row[f"reach_{d}"]), 3) for d in range(1, tree.depth + 2)},
            "grow_ms": round(float(row["grow_ms"]), 2)}  # fmt: skip


BENCH_DRAFTERS = ("eagle", "eagle+lookup", "eagle+lookup-fp32", "eagle-full", "lookup")  # `bench draft --drafter` choices


def bench_draft(target_spec: str, head_dir: Path, prompt_files: list[Path], *, per_set: int, max_new_tokens: int,
                tree: TreeConfig, ngram_max: int, echo: Callable[[str], None],
                which: tuple[str, ...] = BENCH_DRAFTERS, profile: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Per prompt set and drafter, the summary (see `summarise`) and every verification's row.
    Drafters: the EAGLE head over its draft vocabulary, alone and with prompt lookup merged in (the
    runtime's default: int8 weights on x86), the same in exact fp32, the head over the full
    vocabulary, and prompt lookup alone; all replay the same target answers. `which` picks among
    them (BENCH_DRAFTERS). `profile`: cProfile statistics of the replays written there (growth
    times then include the profiler's overhead)."""
    import torch
    from tqdm import tqdm

    from flowspec.config import RuntimeConfig
    from flowspec.lookup import PromptLookupDrafter, WithLookup
    from runtime.drafthead.answers import target_answers
    from runtime.eagle import EagleDrafter, load_eagle
    from runtime.models import load_model, load_tokenizer, resolve_model
    from runtime.prompts import BUILTIN_PROMPTS, encode, read_jsonl

    torch.set_num_threads(2)
    model_dir = resolve_model(target_spec, echo=echo)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    if prompt_files:
        sets = {f.stem: [tokens for tokens, _ in read_jsonl(f, tokenizer)][:per_set] for f in prompt_files}
    else:
        sets = {"builtin": [encode(tokenizer, t) for t in BUILTIN_PROMPTS][:per_set]}
    eos = model.generation_config.eos_token_id
    samples = target_answers(model, model_dir, sets, max_new_tokens, eos[0] if isinstance(eos, list) else eos, echo)
    head = load_eagle(head_dir, model.config.hidden_size)
    embed = model.get_input_embeddings().weight.detach()
    lm_head = model.get_output_embeddings().weight.detach()
    n_vocab = len(head.draft_vocab) if head.draft_vocab is not None else model.config.vocab_size
    vocab_size = model.config.vocab_size
    int8 = RuntimeConfig().draft_int8  # as the runtime drafts by default; "-fp32" rows without
    drafters = {  # key: (table name, factory)
        "eagle": (f"eagle ({n_vocab} draft vocab)", lambda: EagleDrafter(head, embed, lm_head, int8=int8)),
        "eagle+lookup": (f"eagle ({n_vocab} draft vocab) + lookup",
                         lambda: WithLookup(EagleDrafter(head, embed, lm_head, int8=int8), vocab_size, max_n=ngram_max)),
        "eagle+lookup-fp32": (f"eagle ({n_vocab} draft vocab, fp32) + lookup",
                              lambda: WithLookup(EagleDrafter(head, embed, lm_head), vocab_size, max_n=ngram_max)),
        "eagle-full": (f"eagle (full {vocab_size} vocab)",
                       lambda: EagleDrafter(head, embed, lm_head, full_vocab=True, int8=int8)),
        "lookup": (f"prompt lookup (n <= {ngram_max})", lambda: PromptLookupDrafter(vocab_size, max_n=ngram_max)),
    }  # fmt: skip
    if head.draft_vocab is None:
        del drafters["eagle-full"]  # the head already drafts over every token
    frames = []
    profiler = cProfile.Profile() if profile else None
    for name, make in (drafters[key] for key in BENCH_DRAFTERS if key in which and key in drafters):
        drafter = make()
        with tqdm(total=len(samples), desc=name, unit="prompt") as bar:
            profiler and profiler.enable()
            frames.append(replay_all(drafter, samples, tree, bar.update).assign(drafter=name))
            profiler and profiler.disable()
    if profiler:
        profiler.dump_stats(profile)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        echo(f"profile written to {profile}; where the time went:\n{text.getvalue().strip()}")
    rows = pd.concat(frames, ignore_index=True)
    per_set_frame = summarise(rows, ["drafter", "prompt_set"], tree.depth + 1)
    overall = summarise(rows.assign(prompt_set="all"), ["drafter", "prompt_set"], tree.depth + 1)
    return pd.concat([per_set_frame, overall], ignore_index=True), rows
