"""Int8 weights for the draft node's small models on CPU.

A drafter runs a few rows at a time (ten frontier nodes per EAGLE-2 depth), so every linear layer
is a matrix-vector product whose cost is streaming the layer's weights from memory: on this
machine an fp32 EAGLE layer for SmolLM2 (17 MB) takes about 3 ms a call however few rows it runs,
and growing the default tree calls it eight times. Per-channel int8 weights read a quarter of the
bytes; activations stay fp32 and are quantised per call (fbgemm's dynamic linear), so a layer's
outputs move by about 1% of their scale. That changes proposals slightly and never the output:
the target verifies every token. The target's own layers on the stages never come here.

Drafters quantise only the MLP (`DRAFT_INT8_WITHIN`), two thirds of an EAGLE layer's bytes.
Measured with `flowspec bench draft` on 30 held-out prompts (SmolLM2, default tree): the whole
layer in int8 accepted 2.1% fewer tokens per verification than fp32, the MLP alone 0.7% fewer;
attention and the EAGLE `fc` mix in the target's features, and their errors compound down the
tree. LM heads keep their fp32 logits for the top (`runtime.drafters.TopK`).

Only x86 CPUs have the kernel (`available`); elsewhere the drafter stays fp32.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

DRAFT_INT8_WITHIN = "mlp"  # which of a draft model's linear layers go int8 (see the docstring)


def available(device: torch.device | str = "cpu") -> bool:
    return torch.device(device).type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None):
    """fbgemm's packed [out, in] int8 weight, one scale per output row."""
    weight = weight.detach().float().contiguous()
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # torch flags quantized tensors for a future move to torchao
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(weight, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


def linear(x: torch.Tensor, packed) -> torch.Tensor:
    """x @ W.T (+ bias) for a `pack`ed W; x fp32 [..., in]."""
    flat = x.reshape(-1, x.shape[-1]).float().contiguous()
    # reduce_range: 7-bit activations, or fbgemm's int16 pair sums saturate (20% errors, not 1%)
    out = torch.ops.quantized.linear_dynamic(flat, packed, True)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class Int8Linear(nn.Module):
    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = pack(layer.weight, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed)


def int8_copy(module: nn.Module, within: str = "") -> nn.Module:
    """A copy of `module` whose nn.Linear layers named with `within` in their dotted path hold int8
    weights (all of them for ""); the original is untouched."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.Linear) and within in f"{name}.{attr}":
                setattr(child, attr, Int8Linear(sub))
    return module
