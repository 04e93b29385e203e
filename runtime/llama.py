"""Llama-family decoder layers in plain torch, so a stage process never imports transformers.

Theory of operation
-------------------
An edge board holds one slice of the target; importing `transformers`' Llama model code costs a
stage about 100 MB of resident memory before it loads a single weight (measured: 339 MB with it,
224 MB for torch alone), a quarter of a 4-way split of SmolLM2. This module is the part of that
code a stage runs: RMSNorm, rotary embeddings, grouped-query attention over an explicit additive
mask, the gated MLP. It computes what `LlamaDecoderLayer` computes, op for op (the slice tests hold
it to the HF model's output), with the same submodule and parameter names, so checkpoints load by
name and `runtime.quantized` swaps the same `nn.Linear`s.

`LlamaShape` is a checkpoint's `config.json` read as plain JSON: the shapes a layer needs. Bias
terms follow the checkpoint's tensors (Qwen2 has q/k/v biases without saying so in its config).
Only the original rotary embedding (`rope_type: default`) is computed here; a checkpoint with
scaled rotary embeddings (Llama 3.1's `llama3`, YaRN, ...) takes transformers' implementation, at
transformers' import cost.

`KVCache` is the subset of transformers' `DynamicCache` a slice uses (`update`, `get_seq_length`,
`crop`, per-layer `keys`/`values`), so HF layers (the EAGLE head's) and these share one slice code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}  # fmt: skip


class ShapeError(ValueError):
    """A config.json that does not describe a Llama-family decoder (the message names the field)."""


@dataclass(frozen=True, slots=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    rope_type: str
    rope_theta: float
    raw: dict  # the whole config.json, for what this module does not compute itself

    @classmethod
    def read(cls, model_dir: Path) -> LlamaShape:
        path = model_dir / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShapeError(f"{path}: cannot read ({e})") from None
        if not isinstance(raw, dict):
            raise ShapeError(f"{path}: not a JSON object")
        return cls.parse(raw, str(path))

    @classmethod
    def of(cls, config) -> LlamaShape:
        """The shape of a loaded transformers config."""
        return cls.parse(config.to_dict(), f"{type(config).__name__}")

    @classmethod
    def parse(cls, raw: dict, path: str) -> LlamaShape:
        def field(name: str, kind: type | tuple[type, ...], default=None, within: dict = raw):
            value = within.get(name, default)
            if value is None or isinstance(value, bool) or not isinstance(value, kind):
                what = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise ShapeError(f"{path}: {name}: expected {what}, got {value!r}")
            return value

        heads = field("num_attention_heads", int)
        hidden = field("hidden_size", int)
        # transformers 5 writes rope_parameters; older configs say rope_theta and rope_scaling
        rope = raw.get("rope_parameters") or {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta", 10000.0)}
        if not isinstance(rope, dict):
            raise ShapeError(f"{path}: rope_parameters: expected an object, got {rope!r}")
        rope_type = str(rope.get("rope_type", rope.get("type", "default")))
        theta = float(field("rope_theta", (int, float), 10000.0, rope))
        act = field("hidden_act", str, "silu")
        if act not in ACTIVATIONS:
            raise ShapeError(f"{path}: hidden_act: {act!r} is not one of {sorted(ACTIVATIONS)}")
        return cls(hidden, field("intermediate_size", int), heads, field("num_key_value_heads", int, heads),
                   field("head_dim", int, hidden // heads), field("num_hidden_layers", int), field("vocab_size", int),
                   float(field("rms_norm_eps", (int, float), 1e-6)), act, rope_type, theta, raw)  # fmt: skip


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalise in fp32 whatever the weights' precision, as the reference does
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """cos and sin of the original rotary embedding at given positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rotary(config) -> nn.Module:
    """The rotary embedding `config` (a LlamaShape or a transformers config) asks for."""
    if isinstance(config, LlamaShape):
        if config.rope_type == "default":
            return Rotary(config.head_dim, config.rope_theta)
        from transformers import LlamaConfig

        config = LlamaConfig(**config.raw)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "default" and "rope_theta" in rope:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return Rotary(head_dim, float(rope["rope_theta"]))
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, *, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        d, h, kv = shape.head_dim, shape.num_attention_heads, shape.num_key_value_heads
        self.head_dim, self.groups, self.scaling = d, h // kv, d**-0.5
        self.layer_idx = 0  # its layer's index in the slice's cache
        self.q_proj = nn.Linear(shape.hidden_size, h * d, bias=qkv_bias)
        self.k_proj = nn.Linear(shape.hidden_size, kv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(shape.hidden_size, kv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(h * d, shape.hidden_size, bias=o_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        """`x` [B, L, H]; `mask` additive [B, 1, L, kv_len + L]; `rope` (cos, sin) [B, L, head_dim]."""
        rows = x.shape[:-1]
        q, k, v = (proj(x).view(*rows, -1, self.head_dim).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = (t.unsqueeze(1) for t in rope)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, self.layer_idx)
        if self.groups > 1:  # every query head reads its group's key/value head
            k, v = (t.repeat_interleave(self.groups, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        return self.o_proj(out.transpose(1, 2).reshape(*rows, -1))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape, *, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=bias)
        self.act = ACTIVATIONS[shape.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm decoder block; called as transformers calls `LlamaDecoderLayer`."""

    def __init__(self, shape: LlamaShape, *, qkv_bias: bool = False, o_bias: bool = False, mlp_bias: bool = False) -> None:
        super().__init__()
        self.self_attn = Attention(shape, qkv_bias=qkv_bias, o_bias=o_bias)
        self.mlp = MLP(shape, bias=mlp_bias)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, *, attention_mask: torch.Tensor, cache,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], **_) -> torch.Tensor:  # fmt: skip
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    @classmethod
    def for_tensors(cls, shape: LlamaShape, names: set[str]) -> DecoderLayer:
        """A layer with the bias terms that the checkpoint's tensor `names` (relative to the layer) hold."""
        return cls(shape, qkv_bias="self_attn.q_proj.bias" in names, o_bias="self_attn.o_proj.bias" in names,
                   mlp_bias="mlp.gate_proj.bias" in names)  # fmt: skip


class CachedLayer:
    """One layer's keys and values [1, kv_heads, kv_len, head_dim] (None until the first update)."""

    __slots__ = ("keys", "values")

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class KVCache:
    """Per-layer keys and values, appended per forward; see the module docstring."""

    def __init__(self) -> None:
        self.layers: list[CachedLayer] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(CachedLayer())
        layer = self.layers[layer_idx]
        if layer.keys is None:
            layer.keys, layer.values = keys, values
        else:
            layer.keys = torch.cat([layer.keys, keys], dim=-2)
            layer.values = torch.cat([layer.values, values], dim=-2)
        return layer.keys, layer.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers) or self.layers[layer_idx].keys is None:
            return 0
        return self.layers[layer_idx].keys.shape[-2]

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (negative: drop that many from the end)."""
        for layer in self.layers:
            if layer.keys is not None:
                keep = max_length if max_length >= 0 else layer.keys.shape[-2] + max_length
                layer.keys, layer.values = layer.keys[..., :keep, :], layer.values[..., :keep, :]
