"""EAGLE heads: the checkpoint layout round-trips, and the drafter's cached, tree-masked proposals
equal a from-scratch forward over (token, feature) pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from flowspec.tree import DraftTree, root_only
from runtime.eagle import EagleDrafter, EagleHead, load_eagle, save_eagle
from runtime.models import ModelError, load_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts(tiny):
    target = load_model(tiny.folder)
    cfg = target.config
    torch.manual_seed(1)
    head = EagleHead(LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=cfg.vocab_size, max_position_embeddings=256))  # fmt: skip
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    seq = tiny.prompts[0] + tiny.outputs[0]
    with torch.inference_mode():
        features = target.model(torch.tensor([seq])).last_hidden_state[0]  # post-norm f_0 .. f_n
    return target, head, seq, features


def reference_f_hat(head: EagleHead, embed: torch.Tensor, tokens: list[int], features: torch.Tensor) -> torch.Tensor:
    """f̂ of the last row of a plain causal pass over rows i = 1..n: (token i, feature i-1)."""
    n = len(tokens)
    runner = head.slice()
    with torch.inference_mode():
        x = head.fuse(embed[torch.tensor(tokens[1:])], features[: n - 1])
        out = runner(x, torch.arange(1, n), torch.ones(n - 1, n - 1, dtype=torch.bool).tril())
    return out[-1]


def assert_top3(proposed: tuple[np.ndarray, np.ndarray], f_hat: torch.Tensor, lm_head: torch.Tensor, close) -> None:
    """The drafter's top-3 tokens and log-probs are those of `f_hat` (to a tolerance scaled to them).

    Precondition: the top 4 log-probs are further apart than that tolerance, so the order is a
    decision of the model, not of one CPU's rounding."""
    logp = torch.log_softmax(f_hat @ lm_head.T, dim=-1)
    top4 = logp.topk(4).values.numpy()
    assert (-np.diff(top4)).min() > 10 * close.tolerance(top4), f"precondition: near-tie in {top4}"
    top = logp.topk(3)
    assert proposed[0][0].tolist() == top.indices.tolist()
    close(proposed[1][0], top.values.numpy(), "top-3 log-probs")


def test_checkpoint_round_trip_and_errors(parts, tmp_path: Path) -> None:
    _, head, _, _ = parts
    save_eagle(head, tmp_path / "head", dtype=torch.float32)
    loaded = load_eagle(tmp_path / "head", hidden_size=64)
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ModelError, match="hidden_size 64, the target's is 32"):
        load_eagle(tmp_path / "head", hidden_size=32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(head.config.to_dict(), default=str))
    with pytest.raises(ModelError, match="neither model.safetensors nor pytorch_model.bin"):
        load_eagle(tmp_path / "bad", hidden_size=64)


def test_proposals_equal_a_from_scratch_forward(parts, tiny, close) -> None:
    target, head, seq, f = parts
    embed, lm_head = target.get_input_embeddings().weight.detach(), target.get_output_embeddings().weight.detach()
    drafter = EagleDrafter(head, embed, lm_head)
    p = len(tiny.prompts[0])
    prompt = np.array(seq[:p])
    drafter.observe(0, np.full(p, -1), np.full(p, -1), prompt, np.arange(p), f[:p], True)

    # the root (the first generated token) proposes from f_{p-1}
    tree = root_only(seq[p], p, node_id=100)
    f_root = reference_f_hat(head, embed, seq[: p + 1], f)
    assert_top3(drafter.propose(prompt, tree, np.array([0]), 3), f_root, lm_head, close)

    # a child reads the root's f̂, through the cached rows and the tree mask
    child = DraftTree(ids=np.array([100, 101]), tokens=np.array(seq[p : p + 2]), parents=np.array([-1, 0]),
                      positions=np.array([p, p + 1]), scores=np.array([0.0, -0.1]))  # fmt: skip
    with torch.inference_mode():
        mixed = torch.cat([f[:p], f_root[None]])  # true features, then the root's draft feature
    proposed = drafter.propose(prompt, child, np.array([1]), 3)
    assert_top3(proposed, reference_f_hat(head, embed, seq[: p + 2], mixed), lm_head, close)

    # both were accepted: their true features arrive, the committed context grows by two
    drafter.observe(0, np.array([100, 101]), np.array([-1, 100]), np.array(seq[p : p + 2]), np.array([p, p + 1]),
                    f[p : p + 2], False)  # fmt: skip
    context = np.array(seq[: p + 2])
    proposed = drafter.propose(context, root_only(seq[p + 2], p + 2, node_id=102), np.array([0]), 3)
    assert_top3(proposed, reference_f_hat(head, embed, seq[: p + 3], f), lm_head, close)


@pytest.mark.parametrize("root", [1, 6])
def test_training_rollout_equals_the_runtime_chain(parts, root: int, close) -> None:
    """train-draft's rolled-out forward computes, at step k, exactly the f̂ the runtime drafter gives
    the depth-(k-1) node of a chain grown from `root`: same inputs, same mask, same positions."""
    from runtime.drafthead.train import _Trainer

    target, head, seq, features = parts
    embed, lm_head = target.get_input_embeddings().weight.detach(), target.get_output_embeddings().weight.detach()
    tokens = torch.tensor(seq[:12])
    trainer = _Trainer(head, embed, lm_head)
    with torch.no_grad():
        outs = trainer(torch.cat([tokens, torch.zeros(2, dtype=torch.long)])[None], features[None, :12], steps=3)
    drafter = EagleDrafter(head, embed, lm_head)
    none = np.full(12, -1)
    drafter.observe(0, none, none, tokens.numpy(), np.arange(12), features[:12], True)
    chain = DraftTree(ids=np.arange(3), tokens=tokens[root : root + 3].numpy(), parents=np.array([-1, 0, 1]),
                      positions=np.arange(root, root + 3), scores=np.array([0.0, -1.0, -2.0]))  # fmt: skip
    drafter.propose(tokens[:root].numpy(), chain, np.arange(3), 2)
    for depth in range(3):
        close(drafter.kv.out[depth], outs[depth][0, root - 1], f"f-hat at depth {depth}")


def test_draft_vocabulary_round_trips_and_maps_proposals(parts, tmp_path: Path, close) -> None:
    target, head, seq, features = parts
    lm_head = target.get_output_embeddings().weight.detach()
    subset = torch.tensor([3, 5, 8, 13, 21, 34, 55, 89])
    save_eagle(head, tmp_path, draft_vocab=subset)
    loaded = load_eagle(tmp_path, target.config.hidden_size)
    assert loaded.draft_vocab.tolist() == subset.tolist()
    drafter = EagleDrafter(loaded, target.get_input_embeddings().weight.detach(), lm_head)
    none = np.full(len(seq), -1)
    drafter.observe(0, none, none, np.array(seq), np.arange(len(seq)), features, True)
    tokens, logp = drafter.propose(np.array(seq[:5]), root_only(seq[5], 5, 0), np.array([0]), 3)
    f_hat = drafter.kv.out[0]
    top = torch.log_softmax(f_hat @ lm_head[subset].T, dim=-1).topk(3)  # renormalised over the subset
    assert tokens[0].tolist() == subset[top.indices].tolist()
    close(logp[0], top.values.numpy(), "log-probs over the subset")
    full = EagleDrafter(loaded, target.get_input_embeddings().weight.detach(), lm_head, full_vocab=True)
    full.observe(0, none, none, np.array(seq), np.arange(len(seq)), features, True)
    assert_top3(full.propose(np.array(seq[:5]), root_only(seq[5], 5, 0), np.array([0]), 3), f_hat, lm_head, close)


def test_auto_drafter_picks_the_shipped_head_only_for_the_default_model() -> None:
    from flowspec.config import DrafterKind, scenario_from_dict
    from runtime.eagle import default_head
    from runtime.launcher import drafter_kind

    def kind(**runtime) -> DrafterKind:
        return drafter_kind(scenario_from_dict({"runtime": runtime}))

    assert kind() is DrafterKind.EAGLE  # smollm2-135m-instruct ships a head
    assert kind(model="/some/llama") is DrafterKind.NGRAM
    assert kind(model="/some/llama", draft_model="/heads/llama") is DrafterKind.EAGLE
    assert kind(model="/some/llama", drafter="lm", draft_model="/x") is DrafterKind.LM
    assert (default_head("smollm2-135m-instruct") / "model.safetensors").is_file()
    with pytest.raises(ModelError, match=r"no EAGLE head ships for '/some/llama'; train one with `flowspec train-draft"):
        default_head("/some/llama")
