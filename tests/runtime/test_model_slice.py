"""Layer slices of a tiny random Llama: exact against the full model, and exact after pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flowspec.kv import StageLedger
from flowspec.messages import Prune, Segment, SegmentKind
from runtime.model_slice import LayerSlice

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().float()


def reference_hidden(model: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    """Post-norm hidden state of the last token of `tokens`, from one plain causal forward."""
    with torch.inference_mode():
        out = model.model(torch.tensor([tokens]))
    return out.last_hidden_state[0, -1]


def run(slices: list[LayerSlice], ledgers: list[StageLedger], seg: Segment) -> torch.Tensor:
    """Push one segment through every stage the way a stage worker does (ledger protocol)."""
    x: torch.Tensor = torch.tensor(seg.tokens)
    for stage, ledger in zip(slices, ledgers):
        slots, seg_in, rows = ledger.catch_up(seg)
        if slots is not None:
            stage.keep(torch.tensor(slots))
        x = stage(x[torch.tensor(rows)], torch.tensor(seg_in.positions), torch.tensor(ledger.visibility(seg_in)))
        ledger.append(seg_in)
        assert stage.kv_len == ledger.kv_len
    return x


def prefill(tokens: list[int]) -> Segment:
    n = len(tokens)
    return Segment(request_id=0, round=-1, segment_id=0, kind=SegmentKind.PREFILL, node_ids=np.full(n, -1),
                   tokens=np.array(tokens), parent_ids=np.full(n, -1), positions=np.arange(n), version=0,
                   reset=True, final=True)  # fmt: skip


def test_chained_slices_equal_the_full_model(model: LlamaForCausalLM, close) -> None:
    """Slices [0, 1), [1, 3), [3, 4) chained over a prompt give the full model's last hidden state."""
    slices = [LayerSlice.from_model(model, a, b) for a, b in ((0, 1), (1, 3), (3, 4))]
    prompt = [5, 17, 3, 44, 9, 60]
    out = run(slices, [StageLedger() for _ in slices], prefill(prompt))
    close(out[-1], reference_hidden(model, prompt), "last hidden state")


def test_forward_after_a_prune_equals_a_from_scratch_forward(model: LlamaForCausalLM, close) -> None:
    """Invariant 2: after a prune, surviving nodes see exactly their true prefix.

    Prompt P (6 tokens), then a tree (ids 0..5; tokens in brackets):
        0[11] ─┬─ 1[12] ── 3[14] ── 5[16]
               └─ 2[13] ── 4[15]
    sent as segments [0, 1, 2] and [3, 4]. The target accepts 0 → 1 and its bonus is 14 (node 3):
    prune keeps [0, 1 | 3, 5] with a = 2. Then [5] is sent; 3 and 5 must equal plain forwards of
    P + [11, 12, 14] and P + [11, 12, 14, 16] although sibling 2 and its child 4 were in the KV.
    """
    prompt = [5, 17, 3, 44, 9, 60]
    slices = [LayerSlice.from_model(model, a, b) for a, b in ((0, 2), (2, 4))]
    ledgers = [StageLedger() for _ in slices]
    run(slices, ledgers, prefill(prompt))
    g = len(prompt)
    tree = {"ids": [0, 1, 2, 3, 4, 5], "tokens": [11, 12, 13, 14, 15, 16], "parents": [-1, 0, 0, 1, 2, 3],
            "positions": [g, g + 1, g + 1, g + 2, g + 2, g + 3]}  # fmt: skip

    def segment(sid: int, ids: list[int], version: int) -> Segment:
        return Segment(request_id=0, round=0, segment_id=sid, kind=SegmentKind.TREE, node_ids=np.array(ids),
                       tokens=np.array([tree["tokens"][i] for i in ids]),
                       parent_ids=np.array([tree["parents"][i] for i in ids]),
                       positions=np.array([tree["positions"][i] for i in ids]), version=version)  # fmt: skip

    run(slices, ledgers, segment(1, [0, 1, 2], 0))
    out_34 = run(slices, ledgers, segment(2, [3, 4], 0))
    prune = Prune(request_id=0, round=0, version=1, keep_ids=np.array([0, 1, 3, 5]), n_accepted=2, round_exit=False)
    for ledger in ledgers:
        ledger.receive(prune)
    out_5 = run(slices, ledgers, segment(3, [5], 1))
    assert ledgers[0].committed_len == g + 2 and ledgers[0].region_ids.tolist() == [3, 5]
    right = reference_hidden(model, prompt + [11, 12, 14, 16])
    close(out_34[0], reference_hidden(model, prompt + [11, 12, 14]), "node 3 before the prune")
    close(out_34[1], reference_hidden(model, prompt + [11, 13, 15]), "node 4 before the prune")
    close(out_5[0], right, "node 5 after the prune")
    # The same check fails if a pruned sibling stayed visible: the test can tell.
    wrong = reference_hidden(model, prompt + [11, 13, 12, 14, 16])
    assert (out_5[0] - wrong).abs().max().item() > 100 * close.tolerance(right)


def test_a_slice_read_from_the_checkpoint_holds_its_layers_only_and_equals_the_model(model, tmp_path) -> None:
    """A stage reads its own tensors by name: chained, the slices give the full model's output, and
    each holds exactly the parameters of its layers (plus the embedding first, the norm last)."""
    from runtime.models import read_tensors

    model.save_pretrained(tmp_path)
    names = read_tensors(tmp_path, lambda name: True).keys()
    slices = [LayerSlice.from_checkpoint(tmp_path, a, b) for a, b in ((0, 1), (1, 3), (3, 4))]
    for s, (a, b) in zip(slices, ((0, 1), (1, 3), (3, 4))):
        mine = {n for n in names if any(n.startswith(f"model.layers.{i}.") for i in range(a, b))}
        mine |= {"model.embed_tokens.weight"} if a == 0 else set()
        mine |= {"model.norm.weight"} if b == 4 else set()
        own = model.state_dict()
        assert sum(p.numel() for p in s.parameters()) == sum(own[n].numel() for n in mine), (a, b)
    prompt = [5, 17, 3, 44, 9, 60]
    expected = run([LayerSlice.from_model(model, a, b) for a, b in ((0, 1), (1, 3), (3, 4))],
                   [StageLedger() for _ in range(3)], prefill(prompt))  # fmt: skip
    got = run(slices, [StageLedger() for _ in range(3)], prefill(prompt))
    assert torch.equal(got, expected)


def test_a_checkpoint_missing_a_tensor_is_named(model, tmp_path) -> None:
    from safetensors.torch import save_file

    from runtime.models import ModelError

    model.save_pretrained(tmp_path)
    state = {k: v for k, v in model.state_dict().items() if k != "model.layers.2.mlp.up_proj.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    LayerSlice.from_checkpoint(tmp_path, 0, 2)  # layers 0-1 are whole
    with pytest.raises(ModelError, match=r"'model.layers.2.' .*up_proj"):
        LayerSlice.from_checkpoint(tmp_path, 2, 4)


def test_a_bfloat16_slice_computes_in_bfloat16_close_to_float32(model, tmp_path) -> None:
    model.save_pretrained(tmp_path)
    full, half = (LayerSlice.from_checkpoint(tmp_path, 0, 4, dtype=d) for d in (torch.float32, torch.bfloat16))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    prompt = [5, 17, 3, 44, 9, 60]
    a, b = (run([s], [StageLedger()], prefill(prompt)) for s in (full, half))
    assert b.dtype == torch.bfloat16
    assert float((a - b.float()).abs().max()) < 0.1 * float(a.abs().max())  # bf16 keeps ~3 significant digits
