"""A pipeline stage's share of the target: a slice of a Llama-family model with its own KV cache.

Theory of operation
-------------------
`LayerSlice` holds decoder layers [first, last) of a Llama-family causal LM (Llama, SmolLM2, Qwen2,
Mistral-style: anything built from `LlamaDecoderLayer`-shaped blocks), plus the token embedding if
it is the first stage and the final norm if it is the last (FlowSpec's last stage returns
post-norm hidden states; the LM head lives on the draft node). Its layers are numbered from 0 in
its own `KVCache`, which holds only this slice's layers.

`forward` takes the rows of one segment with their absolute positions and a boolean visibility
matrix over [KV slots | rows] — the committed prefix and tree region that `StageLedger` tracks, plus
the segment itself — and turns it into the additive 4D mask attention expects; nothing is causal
by default, so a tree row sees exactly its ancestors. `keep(slots)` gathers KV slots after a prune,
in the ledger's order. No decision is made here: the ledger says what to keep and what is visible.

A slice's layers are `runtime.llama`'s plain-torch blocks, so a stage process never imports
transformers (100 MB of a board's memory). `from_checkpoint` is how a stage gets its slice: its
layers are built from `config.json` and filled with their tensors read by name, so a stage's
memory is its share of the weights, not the model; the first stage maps its embedding table from
the checkpoint file instead of reading it (it looks up a few rows per token: the pages it touches
are resident, the rest of the table stays on disk, as llama.cpp maps weights). `from_model` slices
a model already loaded (tests, the LM drafter), sharing its weights. The constructor also takes
transformers' own layers (the EAGLE head's), which are called the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.llama import DecoderLayer, KVCache, LlamaShape, RMSNorm, ShapeError, rotary


class LayerSlice(nn.Module):
    def __init__(self, config, layers: nn.ModuleList, *, embed: nn.Embedding | None = None,
                 norm: nn.Module | None = None) -> None:  # fmt: skip
        """`config`: a LlamaShape or a transformers config; `layers`: runtime.llama's or transformers'."""
        super().__init__()
        if not isinstance(config, LlamaShape):
            # A standalone HF config may say "eager", whose mask=None path is not causal: we always pass
            # a mask, and sdpa with an explicit additive mask is exact and faster on CPU.
            config._attn_implementation = "sdpa"
        self.config = config
        self.layers = layers
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i  # this stage's cache holds its own layers only
        self.embed = embed
        self.norm = norm
        self.rotary = rotary(config)
        self.cache = KVCache()

    @classmethod
    def from_model(cls, model, first: int, last: int, *, layers_only: bool = False) -> LayerSlice:  # fmt: skip
        """Layers [first, last) of an in-memory Llama-family causal LM (transformers') as plain-torch
        layers that share its weights (nothing is ever written to them); with the embedding and the
        final norm where a stage would hold them, unless `layers_only`."""
        inner = model.model
        n = model.config.num_hidden_layers
        assert 0 <= first < last <= n, f"slice [{first}, {last}) of {n} layers"
        shape = LlamaShape.of(model.config)
        layers = nn.ModuleList()
        for layer in inner.layers[first:last]:
            state = layer.state_dict()
            with torch.device("meta"):  # shapes only: the weights are the model's
                plain = DecoderLayer.for_tensors(shape, set(state))
            plain.load_state_dict(state, strict=True, assign=True)
            layers.append(plain)
        embed = nn.Embedding.from_pretrained(inner.embed_tokens.weight.detach(), freeze=True) if first == 0 and not layers_only else None
        norm = None
        if last == n and not layers_only:
            with torch.device("meta"):
                norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
            norm.load_state_dict(inner.norm.state_dict(), assign=True)
        return cls(shape, layers, embed=embed, norm=norm)

    @classmethod
    def from_checkpoint(cls, model_dir: Path, first: int, last: int, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> LayerSlice:  # fmt: skip
        """Layers [first, last) of the HF checkpoint in `model_dir`, on `device` in `dtype`, reading
        only their tensors (and the embedding for the first stage, the final norm for the last)."""
        from runtime.models import EMBED, ModelError, mapped_tensor, read_tensors

        try:
            shape = LlamaShape.read(model_dir)
        except ShapeError as e:
            raise ModelError(f"runtime.model: {e}") from None
        n = shape.num_hidden_layers
        assert 0 <= first < last <= n, f"slice [{first}, {last}) of {n} layers"
        prefixes = tuple(f"model.layers.{i}." for i in range(first, last)) + (("model.norm.",) if last == n else ())
        tensors = read_tensors(model_dir, lambda name: name.startswith(prefixes))
        layers = nn.ModuleList()
        for i in range(first, last):
            prefix = f"model.layers.{i}."
            state = {k[len(prefix):]: v.to(dtype) for k, v in tensors.items() if k.startswith(prefix)}
            with torch.device("meta"):  # shapes only: an initialised layer would cost its size again while loading
                layer = DecoderLayer.for_tensors(shape, set(state))
            layers.append(_filled(layer, state, model_dir, prefix))
        norm = None
        if last == n:
            state = {k[len("model.norm."):]: v.to(dtype) for k, v in tensors.items() if k.startswith("model.norm.")}
            with torch.device("meta"):
                norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
            norm = _filled(norm, state, model_dir, "model.norm.")
        embed = None
        if first == 0:
            table = mapped_tensor(model_dir, EMBED) if torch.device(device).type == "cpu" else None
            if table is None or table.dtype != dtype:  # not mappable as is: read it
                table = read_tensors(model_dir, EMBED.__eq__).get(EMBED)
            if table is None:
                raise ModelError(f"runtime.model: {model_dir} has no {EMBED} (not a Llama-family checkpoint)")
            if tuple(table.shape) != (shape.vocab_size, shape.hidden_size):
                raise ModelError(f"runtime.model: {model_dir}: {EMBED} is {tuple(table.shape)}, config.json says "
                                 f"({shape.vocab_size}, {shape.hidden_size})")  # fmt: skip
            embed = nn.Embedding.from_pretrained(table.to(device, dtype), freeze=True)
        return cls(shape, layers, norm=norm).to(device=device, dtype=dtype)._with_embed(embed)

    def _with_embed(self, embed: nn.Embedding | None) -> LayerSlice:
        self.embed = embed  # after .to(): a mapped table must not be copied by a no-op cast
        return self

    @property
    def kv_len(self) -> int:
        return self.cache.get_seq_length(0) if len(self.cache.layers) else 0

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Run one segment: `x` token ids [L] (first stage) or hidden states [L, H]; `positions` [L];
        `visible` bool [L, kv_len + L]. Returns hidden states [L, H] (post-norm on the last stage)."""
        n_rows = positions.shape[0]
        assert visible.shape == (n_rows, self.kv_len + n_rows), (tuple(visible.shape), self.kv_len, n_rows)
        h = (self.embed(x) if self.embed is not None else x)[None]  # [1, L, H]
        dtype = h.dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)  # on the layers' device
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min)
        pos = positions[None]  # [1, L]
        rope = self.rotary(h, pos)
        for layer in self.layers:
            h = layer(h, attention_mask=mask[None, None], position_ids=pos, cache=self.cache,
                      use_cache=True, position_embeddings=rope)  # fmt: skip
        if self.norm is not None:
            h = self.norm(h)
        return h[0]

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only KV `slots` (ascending), in that order: the ledger's compaction after a prune."""
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
                slots = slots.to(layer.keys.device)
                layer.keys = layer.keys.index_select(-2, slots)
                layer.values = layer.values.index_select(-2, slots)

    def reset(self) -> None:
        self.cache = KVCache()


def hidden_to_wire(h: torch.Tensor, dtype: str) -> np.ndarray:
    """Hidden states [L, H] as the numpy array that travels (`dtype` names the wire dtype)."""
    if dtype == "bfloat16":  # numpy has no bfloat16: send the raw bits
        return h.to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return h.to("cpu", getattr(torch, dtype)).numpy()


def hidden_from_wire(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The received array as fp32 hidden states (a copy: received frames are read-only)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(array.astype(np.float32, copy=True))


def _filled(module: nn.Module, state: dict, model_dir: Path, prefix: str) -> nn.Module:
    """`module` holding the checkpoint's tensors `state` (named relative to `prefix`), or a ModelError
    that names what does not fit."""
    from runtime.models import ModelError

    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:  # not this architecture, or a damaged checkpoint
        raise ModelError(f"runtime.model: {model_dir}: tensors under {prefix!r} do not fit "
                         f"{type(module).__name__}: missing {missing}, unexpected {unexpected}")  # fmt: skip
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # a shape that does not fit
        raise ModelError(f"runtime.model: {model_dir}: tensors under {prefix!r}: {e}".replace("\n", " ")) from e
    return module
