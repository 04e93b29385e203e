"""Training an EAGLE-style head for a target: data from the target itself, then a short fit.

Theory of operation
-------------------
1. Data: the target answers every prompt greedily (KV-cached `generate`); one more forward over
   prompt + answer gives its post-norm features f_0..f_{T-1} and its own next tokens
   argmax(head(f_i)). Samples are cached in the output folder, so a resumed run skips this.
2. Fit: row i (i >= 1) of a sequence reads (embedding of t_i, f_{i-1} + noise) and predicts f̂_i;
   the loss is EAGLE's: smooth-L1 between f̂_i and f_i plus `ce_weight` × cross-entropy of the
   target's LM head on f̂_i against the target's own token t_{i+1}. Uniform noise on the input
   features, as EAGLE adds, teaches the head to live on its own slightly-off predictions.
3. Evaluate on held-out prompts: top-1 agreement on answer tokens.
4. Save EAGLE's checkpoint layout (`runtime.eagle.save_eagle`) plus `card.json` with the measured
   numbers and provenance. A checkpoint (head, optimiser, step) is written every `save_every` steps;
   `resume` picks it up. Deterministic for a seed on one machine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from runtime.eagle import EagleHead, save_eagle


@dataclass(frozen=True, slots=True)
class TrainConfig:
    minutes: float = 10.0  # wall-clock budget for the fit (data generation not included)
    max_steps: int | None = None  # stop earlier after this many optimiser steps
    max_new_tokens: int = 128  # answer length per prompt
    batch_size: int = 8
    lr: float = 1e-3
    ce_weight: float = 0.1  # EAGLE's weight of the token loss next to the feature regression
    noise: float = 0.1  # half-width of the uniform noise on input features
    holdout: float = 0.2  # share of prompts kept for evaluation
    save_every: int = 50
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Sample:
    tokens: torch.Tensor  # [T] prompt + answer
    features: torch.Tensor  # [T, H] the target's post-norm last hidden states
    next_tokens: torch.Tensor  # [T] the target's greedy token after each position
    n_prompt: int


def make_samples(model, prompts: list[tuple[int, ...]], max_new_tokens: int, eos: int | None,
                 progress: Callable[[int], None] = lambda n: None) -> list[Sample]:  # fmt: skip
    samples = []
    head = model.get_output_embeddings()
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos if eos is not None else 0)[0]  # fmt: skip
            features = model.model(out[None]).last_hidden_state[0]
            samples.append(Sample(out, features, head(features).argmax(-1), len(prompt)))
            progress(1)
    return samples


def new_head(target_config, seed: int) -> EagleHead:
    torch.manual_seed(seed)
    return EagleHead(target_config, bias=True)


class _Trainer(nn.Module):
    """The head plus the frozen target parts it needs, with a causal training forward."""

    def __init__(self, head: EagleHead, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.head = head
        self.rotary = LlamaRotaryEmbedding(head.config)
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("lm_head", lm_head, persistent=False)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """f̂ [B, T-1, H] for rows 1..T-1 of padded batches `tokens` [B, T], `features` [B, T, H]."""
        x = self.head.fuse(self.embed[tokens[:, 1:]], features[:, :-1])
        n = x.shape[1]
        positions = torch.arange(1, n + 1)[None].expand(x.shape[0], -1)
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
        rope = self.rotary(x, positions)
        for layer in self.head.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        return x


def _batch(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T], features [B, T, H], next tokens [B, T] and answer mask [B, T]."""
    t = max(len(s.tokens) for s in samples)
    h = samples[0].features.shape[1]
    tokens = torch.zeros(len(samples), t, dtype=torch.long)
    features = torch.zeros(len(samples), t, h)
    nxt = torch.zeros(len(samples), t, dtype=torch.long)
    answer = torch.zeros(len(samples), t, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s.tokens)
        tokens[b, :n], features[b, :n], nxt[b, :n] = s.tokens, s.features, s.next_tokens
        answer[b, s.n_prompt - 1 : n - 1] = True  # positions whose next token is an answer token
    return tokens, features, nxt, answer


def losses(trainer: _Trainer, samples: list[Sample], noise: float, ce_weight: float,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
    """EAGLE's loss on a batch, and the top-1 agreement on answer tokens."""
    tokens, features, nxt, answer = _batch(samples)
    valid = torch.zeros_like(answer)
    for b, s in enumerate(samples):
        valid[b, 1 : len(s.tokens)] = True
    noisy = features
    if noise > 0:
        noisy = features + (torch.rand(features.shape, generator=generator) * 2 - 1) * noise
    f_hat = trainer(tokens, noisy)  # rows 1..T-1
    rows = valid[:, 1:]
    reg = nn.functional.smooth_l1_loss(f_hat[rows], features[:, 1:][rows])
    logits = f_hat @ trainer.lm_head.T
    ce = nn.functional.cross_entropy(logits[rows], nxt[:, 1:][rows])
    scored = (answer[:, 1:] & rows)
    agree = (logits.argmax(-1) == nxt[:, 1:])[scored].float().mean().item() if scored.any() else float("nan")
    return reg + ce_weight * ce, agree


def evaluate(trainer: _Trainer, samples: list[Sample]) -> float:
    with torch.no_grad():
        return losses(trainer, samples, 0.0, 0.0)[1]


def train_draft(model, prompts: list[tuple[int, ...]], out: Path, config: TrainConfig, *, eos: int | None = None,
                resume: bool = False, echo: Callable[[str], None] = print, target_name: str = "?") -> dict:  # fmt: skip
    """Train, evaluate and save a head for `model`; the card (also written to out/card.json)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    data_path = out / "samples.pt"
    if resume and data_path.is_file():
        samples = [Sample(**d) for d in torch.load(data_path, weights_only=True)]
        echo(f"reusing {len(samples)} target answers from {data_path}")
    else:
        with tqdm(total=len(prompts), desc="target answers", unit="prompt") as bar:
            samples = make_samples(model, prompts, config.max_new_tokens, eos, bar.update)
        torch.save([asdict(s) for s in samples], data_path)
    n_eval = max(1, int(round(len(samples) * config.holdout))) if len(samples) > 1 else 0
    train, held = samples[n_eval:], samples[:n_eval] or samples
    head = new_head(model.config, config.seed)
    trainer = _Trainer(head, model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach())
    optimiser = torch.optim.AdamW(head.parameters(), lr=config.lr)
    step = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        head.load_state_dict(state["head"])
        optimiser.load_state_dict(state["optimiser"])
        step = int(state["step"])
        echo(f"resuming at step {step}")
    before = evaluate(trainer, held)
    generator = torch.Generator().manual_seed(config.seed + step)
    order = torch.randperm(len(train), generator=generator)
    deadline = time.monotonic() + config.minutes * 60
    t0 = time.monotonic()
    with tqdm(desc="training", unit="step", initial=step, total=config.max_steps) as bar:
        while time.monotonic() < deadline and (config.max_steps is None or step < config.max_steps):
            idx = [(step * config.batch_size + j) % len(train) for j in range(config.batch_size)]
            loss, agree = losses(trainer, [train[int(order[i])] for i in idx], config.noise, config.ce_weight, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{agree:.2f}")
            if step % config.save_every == 0:
                torch.save({"head": head.state_dict(), "optimiser": optimiser.state_dict(), "step": step}, ckpt)
    torch.save({"head": head.state_dict(), "optimiser": optimiser.state_dict(), "step": step}, ckpt)
    after = evaluate(trainer, held)
    save_eagle(head, out)
    card = {
        "target": target_name, "trainable_parameters": sum(p.numel() for p in head.parameters()),
        "steps": step, "fit_minutes": round((time.monotonic() - t0) / 60, 2), "train_prompts": len(train),
        "heldout_prompts": len(held), "heldout_top1_answer_tokens": {"untrained": before, "trained": after},
        "config": asdict(config), "machine": f"{torch.get_num_threads()} torch thread(s), {torch.__version__}",
    }  # fmt: skip
    (out / "card.json").write_text(json.dumps(card, indent=2))
    echo(f"held-out top-1 on answer tokens: {before:.3f} untrained -> {after:.3f} after {step} steps")
    return card
