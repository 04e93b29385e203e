"""The plain-torch decoder layers a stage runs: what transformers computes, for the Llama family,
from config.json alone, and without importing transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from flowspec.kv import StageLedger
from flowspec.messages import Segment, SegmentKind
from runtime.llama import LlamaShape, ShapeError
from runtime.model_slice import LayerSlice
from runtime.models import EMBED, mapped_tensor, read_tensors

torch.set_num_threads(1)
SHAPES = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
PROMPT = [5, 17, 3, 44, 9, 60, 2, 71]


def last_hidden(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(torch.tensor([tokens])).last_hidden_state[0]


def slices_forward(folder, cuts) -> torch.Tensor:
    """The prompt through checkpoint slices [a, b) chained, as stages run it (all rows causal)."""
    n = len(PROMPT)
    seg = Segment(request_id=0, round=-1, segment_id=0, kind=SegmentKind.PREFILL, node_ids=np.full(n, -1),
                  tokens=np.array(PROMPT), parent_ids=np.full(n, -1), positions=np.arange(n), version=0,
                  reset=True, final=True)  # fmt: skip
    x = torch.tensor(PROMPT)
    for a, b in cuts:
        ledger, stage = StageLedger(), LayerSlice.from_checkpoint(folder, a, b)
        _, seg_in, _ = ledger.catch_up(seg)
        x = stage(x, torch.tensor(seg_in.positions), torch.tensor(ledger.visibility(seg_in)))
    return x


@pytest.mark.parametrize("family", ["llama", "qwen2-with-qkv-bias", "llama-old-rope-config"])
def test_checkpoint_slices_compute_what_transformers_computes(family, tmp_path, close) -> None:
    torch.manual_seed(1)
    if family.startswith("qwen2"):
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES, rope_theta=5000.0)).eval()
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # the case this pins
    else:
        model = LlamaForCausalLM(LlamaConfig(**SHAPES, rope_theta=5000.0)).eval()
    for p in model.parameters():  # biases start at zero: make them count
        p.data.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    if family == "llama-old-rope-config":  # a transformers 4.x config: rope_theta at the top level
        raw = json.loads((tmp_path / "config.json").read_text())
        raw["rope_theta"] = raw.pop("rope_parameters")["rope_theta"]
        (tmp_path / "config.json").write_text(json.dumps(raw))
    close(slices_forward(tmp_path, [(0, 2), (2, 3)]), last_hidden(model, PROMPT), family)


def test_a_wrong_rotary_base_would_be_caught(tmp_path, close) -> None:
    """The comparison above can fail: the same weights with another rope_theta differ beyond tolerance."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES, rope_theta=5000.0)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"]["rope_theta"] = 50.0
    (tmp_path / "config.json").write_text(json.dumps(raw))
    got, expected = slices_forward(tmp_path, [(0, 3)]), last_hidden(model, PROMPT)
    assert float((got - expected).abs().max()) > 100 * close.tolerance(expected)


def test_a_config_that_is_not_a_decoder_names_the_field(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**SHAPES, "num_attention_heads": "four"}))
    with pytest.raises(ShapeError, match=r"config.json: num_attention_heads: expected int, got 'four'"):
        LlamaShape.read(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SHAPES, "hidden_act": "mish"}))
    with pytest.raises(ShapeError, match=r"hidden_act: 'mish' is not one of"):
        LlamaShape.read(tmp_path)


def test_the_first_stage_maps_its_embedding_table(tmp_path) -> None:
    """Mapped, not read: equal to the stored table, and backed by the file (a copy-on-write map)."""
    torch.manual_seed(2)
    LlamaForCausalLM(LlamaConfig(**SHAPES)).save_pretrained(tmp_path)
    mapped = mapped_tensor(tmp_path, EMBED)
    assert mapped is not None and torch.equal(mapped, read_tensors(tmp_path, EMBED.__eq__)[EMBED])
    stage = LayerSlice.from_checkpoint(tmp_path, 0, 1)
    assert stage.embed.weight.data_ptr() != 0 and torch.equal(stage.embed.weight, mapped)
    assert mapped_tensor(tmp_path, "no.such.tensor") is None


def test_a_stage_process_never_imports_transformers(tiny) -> None:
    """Not to import, and not to start either: a stage that has read its bounds and loaded its slice
    (then waited in vain for D0's peer list) holds no transformers module (80 MB of a board)."""
    code = """
import sys
from pathlib import Path
from runtime.channel import StageTimeout
from runtime.stage import StagePlan, StageWorker
plan = StagePlan(2, 2, 3, 5, "tcp://127.0.0.1:9", "127.0.0.1", 0, None, timeout_s=5.0, startup_timeout_s=0.2,
                 device="cpu", dtype="float32", watch_parent=False, head=True)
worker = StageWorker(plan, Path(sys.argv[1]))
try:
    worker.start()
except StageTimeout:
    pass
worker.close()
print(len(worker.slice.layers), sorted(m for m in sys.modules if m.startswith("transformers")))
"""
    done = subprocess.run([sys.executable, "-c", code, str(tiny.folder)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []"
