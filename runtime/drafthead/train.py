"""Training an EAGLE-style head for a target: data from the target itself, then a short fit.

Theory of operation
-------------------
1. Data: the target answers every prompt greedily (batched, KV-cached `generate`); one more
   teacher-forced forward over prompt + answer gives its post-norm features f_0..f_{T-1} and its
   own next tokens argmax(head(f_i)). Samples are cached in the output folder (`--resume`).
2. Draft vocabulary: the `draft_vocab` tokens the target predicts most often in the training
   answers (EAGLE-3's idea). The head's LM head is the target's, restricted to those rows: ~6x
   cheaper per call for SmolLM2's 49k vocabulary; verification still uses the full vocabulary.
3. Fit, rolled out over `rollout` steps (EAGLE-3's training-time test). Step 1 row i reads
   (embedding of t_i, f_{i-1} + noise) and predicts f̂_i; step k reads the step k-1 output in
   place of the true feature, under the same mask a draft tree sees at run time. Each step's loss
   is `reg_weight` × smooth-L1(f̂, f) + `ce_weight` × cross-entropy of the LM head on f̂ against
   the target's own next token, weighted 0.8^(k-1). Without rollout a head is good at depth 1 and
   poor after (env-notes §6: 10-20% conditional acceptance from depth 2 on).
4. Evaluate on held-out prompts: top-1 agreement on answer tokens, and an EAGLE-2 tree replay
   (`runtime.drafthead.evaluate`): mean accepted tokens per verification and the share reaching each depth.
5. Save EAGLE's checkpoint layout (`runtime.eagle.save_eagle`, plus `draft_vocab`) and `card.json`
   with the measured numbers and provenance. A checkpoint (head, optimiser, step) is written every
   `save_every` steps; `resume` picks it up. Deterministic for a seed on one machine.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from flowspec.config import TreeConfig
from runtime.drafthead.answers import Sample, load_samples, make_samples, save_samples
from runtime.drafthead.evaluate import replay_all, tree_card
from runtime.eagle import EagleDrafter, EagleHead, save_eagle


@dataclass(frozen=True, slots=True)
class TrainConfig:
    minutes: float = 10.0  # wall-clock budget for the fit (data generation not included)
    max_steps: int | None = None  # stop earlier after this many optimiser steps
    max_new_tokens: int = 128  # answer length per prompt
    batch_size: int = 8
    lr: float = 1e-3
    ce_weight: float = 1.0  # token loss; EAGLE weighs it 0.1, but on CPU budgets 1.0 learns top-1 faster
    reg_weight: float = 0.1  # feature regression (smooth-L1 against the target's next feature)
    noise: float = 0.1  # half-width of the uniform noise on step-1 input features
    rollout: int = 3  # training-time rollout steps: the head learns to read its own f̂ (EAGLE-3)
    draft_vocab: int = 8192  # frequency-ranked draft vocabulary; 0 = the full vocabulary
    holdout: float = 0.1  # share of prompts kept for evaluation
    save_every: int = 50
    eval_prompts: int = 24  # held-out prompts replayed with the default tree for the card
    seed: int = 0


def held_out(sample: Sample, share: float) -> bool:
    """Whether a prompt is held out: a hash of its tokens, so the split is stable when data is added."""
    digest = zlib.crc32(sample.tokens[: sample.n_prompt].numpy().astype("int64").tobytes())
    return digest / 2**32 < share


def new_head(model, seed: int) -> EagleHead:
    # A randomly initialised layer: copying the target's last layer in (and fc passing f through)
    # made the rolled-out loss diverge on small targets.
    torch.manual_seed(seed)
    return EagleHead(model.config, bias=True)


def draft_vocabulary(samples: list[Sample], size: int, vocab_size: int) -> torch.Tensor | None:
    """The `size` tokens the target predicts most often in `samples` (ties: lower id first), sorted
    by id; None when that is the whole vocabulary."""
    if size <= 0 or size >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in samples:
        counts += torch.bincount(s.next_tokens, minlength=vocab_size)
    ranked = sorted(range(vocab_size), key=lambda t: (-int(counts[t]), t))[:size]
    return torch.tensor(sorted(ranked), dtype=torch.long)


class _Trainer(nn.Module):
    """The head plus the frozen target parts it needs, with a rolled-out training forward."""

    def __init__(self, head: EagleHead, embed: torch.Tensor, lm_head: torch.Tensor,
                 vocab: torch.Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.head = head
        self.rotary = LlamaRotaryEmbedding(head.config)
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("lm_head", lm_head if vocab is None else lm_head[vocab], persistent=False)
        index = torch.arange(lm_head.shape[0]) if vocab is None else torch.full((lm_head.shape[0],), -100)
        if vocab is not None:
            index[vocab] = torch.arange(len(vocab))
        self.register_buffer("index", index, persistent=False)  # token -> row of self.lm_head (-100: none)
        self.register_buffer("tokens_of", vocab if vocab is not None else torch.arange(lm_head.shape[0]),
                             persistent=False)  # fmt: skip

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, steps: int = 1) -> list[torch.Tensor]:
        """f̂ [B, n, H] per rollout step, n = T-1, for padded `tokens` [B, T + steps - 1], `features` [B, T, H].

        Step 1 row r sits at position p = r+1 and reads (t_p, f_{p-1}), as a committed row does.
        Step k row r sits at p+k-1 and reads (t_{p+k-1}, f̂ of step k-1, row r): the chain a draft tree
        grows from root p. It sees the step-1 rows up to r and its own chain, as the runtime's tree
        mask lets a node see the committed rows and its ancestors (EAGLE-3's training-time test).
        """
        from transformers import DynamicCache

        n = features.shape[1] - 1
        batch = features.shape[0]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        eye = torch.eye(n, dtype=torch.bool)
        cache = DynamicCache()
        outs = []
        previous = features[:, :-1]
        for k in range(1, steps + 1):
            x = self.head.fuse(self.embed[tokens[:, k : k + n]], previous)
            visible = torch.cat([causal] + [eye] * (k - 1), dim=1)
            mask = torch.zeros(visible.shape, dtype=x.dtype).masked_fill(~visible, torch.finfo(x.dtype).min)
            positions = torch.arange(k, n + k)[None].expand(batch, -1)
            rope = self.rotary(x, positions)
            for layer in self.head.layers:
                x = layer(x, attention_mask=mask[None, None], position_ids=positions, cache=cache,
                          use_cache=True, position_embeddings=rope)  # fmt: skip
            outs.append(x)
            previous = x
        return outs


def _batch(samples: list[Sample], extra: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T + extra], features [B, T, H], next tokens [B, T + extra], answer
    mask [B, T] and lengths [B]."""
    t = max(len(s.tokens) for s in samples)
    h = samples[0].features.shape[1]
    tokens = torch.zeros(len(samples), t + extra, dtype=torch.long)
    features = torch.zeros(len(samples), t, h)
    nxt = torch.zeros(len(samples), t + extra, dtype=torch.long)
    answer = torch.zeros(len(samples), t, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.tokens)
        tokens[b, :n], features[b, :n], nxt[b, :n] = s.tokens, s.features.float(), s.next_tokens
        answer[b, s.n_prompt - 1 : n - 1] = True  # positions whose next token is an answer token
    return tokens, features, nxt, answer, torch.tensor([len(s.tokens) for s in samples])


STEP_DECAY = 0.8  # weight of rollout step k is 0.8^(k-1), as in EAGLE-3


def losses(trainer: _Trainer, samples: list[Sample], noise: float, ce_weight: float, reg_weight: float = 1.0,
           steps: int = 1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """The rolled-out loss on a batch (per step: `reg_weight` × smooth-L1 on features plus
    `ce_weight` × cross-entropy against the target's tokens), and each step's top-1 on answer tokens
    (step k reads its own f̂ from step k-1: the agreement a draft chain sees at depth k)."""
    tokens, features, nxt, answer, lengths = _batch(samples, steps - 1)
    n = features.shape[1] - 1
    noisy = features
    if noise > 0:
        noisy = features + (torch.rand(features.shape, generator=generator) * 2 - 1) * noise
    total = torch.zeros(())
    agree = []
    target_features = torch.cat([features, torch.zeros_like(features[:, : steps - 1])], dim=1)
    answer = torch.cat([answer, torch.zeros_like(answer[:, : steps - 1])], dim=1)
    for k, f_hat in enumerate(trainer(tokens, noisy, steps), start=1):
        positions = torch.arange(k, n + k)
        rows = positions[None] < lengths[:, None]  # [B, n]: the step's position is inside the sequence
        reg = nn.functional.smooth_l1_loss(f_hat[rows], target_features[:, positions][rows])
        logits = f_hat[rows] @ trainer.lm_head.T
        labels = trainer.index[nxt[:, positions][rows]]
        ce = nn.functional.cross_entropy(logits, labels, ignore_index=-100) if (labels >= 0).any() else logits.sum() * 0
        total = total + STEP_DECAY ** (k - 1) * (reg_weight * reg + ce_weight * ce)
        scored = answer[:, positions][rows]
        hits = trainer.tokens_of[logits.argmax(-1)] == nxt[:, positions][rows]
        agree.append(hits[scored].float().mean().item() if scored.any() else float("nan"))
    return total, agree


def evaluate(trainer: _Trainer, samples: list[Sample], batch_size: int = 8, steps: int = 1) -> list[float]:
    """Top-1 agreement on answer tokens (over the trainer's vocabulary) at each rollout step, weighted by
    answer tokens."""
    scores = []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            weight = sum(len(s.tokens) - s.n_prompt for s in chunk)
            scores.append((losses(trainer, chunk, 0.0, 0.0, steps=steps)[1], weight))
    out = []
    for k in range(steps):
        valid = [(a[k], w) for a, w in scores if a[k] == a[k]]
        total = sum(w for _, w in valid)
        out.append(sum(a * w for a, w in valid) / total if total else float("nan"))
    return out


def chain_score(agree: list[float]) -> float:
    """Expected draft tokens a top-1 chain gets accepted, were depths independent: a1 + a1·a2 + ...
    The criterion for keeping the best checkpoint (a tree accepts more, but ranks heads alike)."""
    score, reach = 0.0, 1.0
    for a in agree:
        reach *= a
        score += reach
    return score


def train_draft(model, prompts: list[tuple[int, ...]], out: Path, config: TrainConfig, *, eos: int | None = None,
                resume: bool = False, echo: Callable[[str], None] = print, target_name: str = "?",
                sources: list[str] | None = None) -> dict:  # fmt: skip
    """Train, evaluate and save a head for `model`; the card (also written to out/card.json)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data_path = out / "samples.pt"
    if resume and data_path.is_file():
        samples = load_samples(data_path)
        echo(f"reusing {len(samples)} target answers from {data_path}")
    else:
        with tqdm(total=len(prompts), desc="target answers", unit="prompt") as bar:
            samples = make_samples(model, prompts, config.max_new_tokens, eos, bar.update, sources=sources)
        save_samples(samples, data_path)
    held = [s for s in samples if held_out(s, config.holdout)] or samples[:1]
    train = [s for s in samples if not held_out(s, config.holdout)] or samples
    vocab = draft_vocabulary(train, config.draft_vocab, model.config.vocab_size)
    head = new_head(model, config.seed)
    trainer = _Trainer(head, model.get_input_embeddings().weight.detach(),
                       model.get_output_embeddings().weight.detach(), vocab)  # fmt: skip
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr)
    step = 0
    ckpt = out / "checkpoint.pt"
    before = None
    curve: list[dict] = []  # held-out agreement every `save_every` steps
    best: dict = {}  # the best checkpoint by held-out chain score: step, score, head weights
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        head.load_state_dict(state["head"])
        optimiser.load_state_dict(state["optimiser"])
        step, before = int(state["step"]), float(state["untrained"])
        curve, best = state.get("curve", []), state.get("best", {})
        echo(f"resuming at step {step}")
    if before is None:
        before = evaluate(trainer, held)[0]
    seen = train[:16]  # how well the head fits what it saw: learning at all, even where nothing generalises
    seen_before = evaluate(trainer, seen)[0]
    probe = held[:16]  # scored every save_every steps: the learning curve and the best checkpoint

    def checkpoint() -> None:
        state = {"head": head.state_dict(), "optimiser": optimiser.state_dict(), "step": step, "untrained": before,
                 "curve": curve, "best": best}  # fmt: skip
        torch.save(state, ckpt)

    def score() -> None:
        agree = evaluate(trainer, probe, steps=config.rollout)
        curve.append({"step": step, "minutes": round((time.monotonic() - t0) / 60, 2),
                      "heldout_top1_by_depth": [round(a, 4) for a in agree], "chain_score": round(chain_score(agree), 4)})  # fmt: skip
        if curve[-1]["chain_score"] > best.get("score", -1.0):
            best.update(step=step, score=curve[-1]["chain_score"],
                        head={k: v.clone() for k, v in head.state_dict().items()})  # fmt: skip

    generator = torch.Generator().manual_seed(config.seed + step)
    order = torch.randperm(len(train), generator=generator)
    t0 = time.monotonic()
    budget_s = config.minutes * 60
    with tqdm(desc="training", unit="step", initial=step, total=config.max_steps) as bar:
        while time.monotonic() - t0 < budget_s and (config.max_steps is None or step < config.max_steps):
            # warm-up, then cosine decay to 10% over the step budget (or the time budget without one)
            done = step / config.max_steps if config.max_steps else (time.monotonic() - t0) / max(budget_s, 1e-9)
            scale = min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))
            for group in optimiser.param_groups:
                group["lr"] = config.lr * scale
            idx = [(step * config.batch_size + j) % len(train) for j in range(config.batch_size)]
            loss, agree = losses(trainer, [train[int(order[i])] for i in idx], config.noise, config.ce_weight,
                                 config.reg_weight, config.rollout, generator)  # fmt: skip
            optimiser.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 0.5)  # EAGLE's clip: rollouts feed back their own errors
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{agree[0]:.2f}")
            if step % config.save_every == 0:
                score()
                checkpoint()
                bar.write(f"step {step}: held-out top-1 by depth {curve[-1]['heldout_top1_by_depth']}, chain score "
                          f"{curve[-1]['chain_score']:.3f} (best {best['score']:.3f} at step {best['step']})")  # fmt: skip
    if not curve or curve[-1]["step"] != step:
        score()
    checkpoint()
    final_step = step
    seen_last = seen_kept = evaluate(trainer, seen)[0]
    if best and best["step"] != step:  # early stopping after the fact: later steps only overfit
        head.load_state_dict(best["head"])
        seen_kept = evaluate(trainer, seen)[0]
        echo(f"keeping step {best['step']} (held-out chain score {best['score']:.3f}) over step {step} "
             f"({curve[-1]['chain_score']:.3f})")  # fmt: skip
    after = evaluate(trainer, held)[0]
    head.draft_vocab = vocab
    save_eagle(head, out)
    tree = TreeConfig()  # the runtime's default EAGLE-2 tree
    replayed = held[: config.eval_prompts]
    with tqdm(total=len(replayed), desc="tree replay (held-out)", unit="prompt") as bar:
        drafter = EagleDrafter(head.eval(), trainer.embed, model.get_output_embeddings().weight.detach())
        frame = replay_all(drafter, replayed, tree, bar.update)
    card = {
        "target": target_name, "trainable_parameters": sum(p.numel() for p in head.parameters()),
        "steps": final_step, "kept_step": best.get("step", final_step),
        "fit_minutes": round((time.monotonic() - t0) / 60, 2), "train_prompts": len(train),
        "heldout_prompts": len(held), "draft_vocab": len(vocab) if vocab is not None else model.config.vocab_size,
        "train_tokens": sum(len(s.tokens) for s in train),
        "train_answer_tokens": sum(len(s.tokens) - s.n_prompt for s in train),
        "prompt_sets": dict(Counter(s.source for s in samples)),
        "heldout_top1_answer_tokens": {"untrained": before, "trained": after},
        "heldout_tree_replay": {"prompts": len(replayed), **tree_card(frame, tree)},
        "train_top1_answer_tokens": {"before_this_run": seen_before, "last_step": seen_last,
                                     "kept_step": seen_kept},
        "learning_curve": curve,
        "config": asdict(config), "machine": f"{torch.get_num_threads()} torch thread(s), {torch.__version__}",
    }  # fmt: skip
    (out / "card.json").write_text(json.dumps(card, indent=2))
    echo(f"held-out top-1 on answer tokens: {before:.3f} untrained -> {after:.3f} after {step} steps; "
         f"default tree: {card['heldout_tree_replay']['mean_accepted_per_verification']:.2f} tokens per verification")
    return card
