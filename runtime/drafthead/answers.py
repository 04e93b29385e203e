"""The target's own answers: what heads are trained on and drafters are scored against.

Theory of operation
-------------------
The target answers every prompt greedily (batched, KV-cached `generate`); one more teacher-forced
forward over prompt + answer gives its post-norm features f_0..f_{T-1} and its own next tokens
argmax(head(f_i)): a `Sample`. Training (`train`) fits a head to them and the offline benchmark
(`evaluate`) replays draft trees over them; both read them from here, and the benchmark caches
them between runs (`target_answers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True, slots=True)
class Sample:
    tokens: torch.Tensor  # [T] prompt + answer
    features: torch.Tensor  # [T, H] the target's post-norm last hidden states
    next_tokens: torch.Tensor  # [T] the target's greedy token after each position
    n_prompt: int
    source: str = ""  # prompt set


def save_samples(samples: list[Sample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([asdict(s) for s in samples], path)


def load_samples(path: Path) -> list[Sample]:
    return [Sample(**d) for d in torch.load(path, weights_only=True)]


def make_samples(model, prompts: list[tuple[int, ...]], max_new_tokens: int, eos: int | None,
                 progress: Callable[[int], None] = lambda n: None, *, batch_size: int = 16,
                 sources: list[str] | None = None) -> list[Sample]:  # fmt: skip
    """The target's greedy answers, `batch_size` prompts at a time (left-padded, similar lengths
    together); features and next tokens come from one teacher-forced pass over each sequence, so
    labels are the target's own argmax in exactly the context the head will see."""
    head = model.get_output_embeddings()
    pad = eos if eos is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, Sample] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)[:, width:]  # fmt: skip
            seqs = []
            for row, i in enumerate(chunk):
                answer = gen[row].tolist()
                if eos is not None and eos in answer:
                    answer = answer[: answer.index(eos) + 1]
                seqs.append(torch.tensor(list(prompts[i]) + answer))
            longest = max(len(q) for q in seqs)
            tf = torch.full((len(seqs), longest), pad, dtype=torch.long)
            tf_mask = torch.zeros_like(tf)
            for row, q in enumerate(seqs):  # right-padded: padding never precedes a real token
                tf[row, : len(q)], tf_mask[row, : len(q)] = q, 1
            features = model.model(tf, attention_mask=tf_mask).last_hidden_state
            for row, i in enumerate(chunk):
                n = len(seqs[row])
                f = features[row, :n].clone()
                out[i] = Sample(seqs[row], f, head(f).argmax(-1), len(prompts[i]), sources[i] if sources else "")
            progress(len(chunk))
    return [out[i] for i in range(len(prompts))]


def answers_cache(model_dir: Path, prompts: list[tuple[int, ...]], max_new_tokens: int) -> Path:
    """Where the target's answers to `prompts` are cached between benchmark runs."""
    import hashlib

    from runtime.models import cache_dir

    key = hashlib.sha1(repr((str(model_dir), prompts, max_new_tokens)).encode()).hexdigest()[:16]
    return cache_dir() / "answers" / f"{key}.pt"


def target_answers(model, model_dir: Path, sets: dict[str, list[tuple[int, ...]]], max_new_tokens: int, eos: int | None,
                   echo: Callable[[str], None]) -> list:  # fmt: skip
    """The target's answers (`Sample`, source = set name) to every set's prompts, cached."""
    from tqdm import tqdm

    prompts = [p for ps in sets.values() for p in ps]
    sources = [name for name, ps in sets.items() for _ in ps]
    path = answers_cache(model_dir, prompts, max_new_tokens)
    if path.is_file():
        echo(f"reusing the target's answers from {path}")
        return load_samples(path)
    with tqdm(total=len(prompts), desc="target answers", unit="prompt") as bar:
        samples = make_samples(model, prompts, max_new_tokens, eos, bar.update, sources=sources)
    save_samples(samples, path)
    return samples
