"""A pipeline stage's share of the target: a slice of a Llama-family model with its own KV cache.

Theory of operation
-------------------
`LayerSlice` holds decoder layers [first, last) of a HF causal LM (Llama, SmolLM2, Qwen2,
Mistral-style: anything built from `LlamaDecoderLayer`-shaped blocks), plus the token embedding if
it is the first stage and the final norm if it is the last (FlowSpec's last stage returns
post-norm hidden states; the LM head lives on the draft node). Its layers are renumbered from 0 so
the stage's `DynamicCache` holds only its own layers.

`forward` takes the rows of one segment with their absolute positions and a boolean visibility
matrix over [KV slots | rows] — the committed prefix and tree region that `StageLedger` tracks, plus
the segment itself — and turns it into the additive 4D mask attention expects; nothing is causal
by default, so a tree row sees exactly its ancestors. `keep(slots)` gathers KV slots after a prune,
in the ledger's order. No decision is made here: the ledger says what to keep and what is visible.

`from_checkpoint` is how a stage gets its slice: the architecture is built on the meta device (no
memory), its own layers are kept and filled with their tensors read by name from the checkpoint,
so a stage's memory is its share of the weights, not the model (`from_model` slices a model that is
already loaded, for tests and the LM drafter).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


class LayerSlice(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layers: nn.ModuleList,
        *,
        embed: nn.Embedding | None = None,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # A standalone config may say "eager", whose mask=None path is not causal: we always pass a
        # mask, and sdpa with an explicit additive mask is exact and faster on CPU.
        config._attn_implementation = "sdpa"
        self.config = config
        self.layers = layers
        for i, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = i  # this stage's cache holds its own layers only
        self.embed = embed
        self.norm = norm
        self.rotary = LlamaRotaryEmbedding(config)
        self.cache = DynamicCache()

    @classmethod
    def from_model(cls, model: PreTrainedModel, first: int, last: int) -> LayerSlice:
        """Layers [first, last) of an in-memory causal LM, copied: renumbering the layers for this
        stage's cache must not disturb the model they came from."""
        inner = model.model
        n = model.config.num_hidden_layers
        assert 0 <= first < last <= n, f"slice [{first}, {last}) of {n} layers"
        return cls(
            copy.deepcopy(model.config),
            copy.deepcopy(nn.ModuleList(inner.layers[first:last])),
            embed=copy.deepcopy(inner.embed_tokens) if first == 0 else None,
            norm=copy.deepcopy(inner.norm) if last == n else None,
        )

    @classmethod
    def from_checkpoint(cls, model_dir: Path, first: int, last: int, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> LayerSlice:  # fmt: skip
        """Layers [first, last) of the HF checkpoint in `model_dir`, on `device` in `dtype`, reading
        only their tensors (and the embedding for the first stage, the final norm for the last)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from runtime.models import ModelError, read_tensors

        config = AutoConfig.from_pretrained(model_dir)
        n = config.num_hidden_layers
        assert 0 <= first < last <= n, f"slice [{first}, {last}) of {n} layers"
        with torch.device("meta"):  # the architecture without its weights
            inner = AutoModelForCausalLM.from_config(config).model
        parts = {f"model.layers.{i}.": inner.layers[i] for i in range(first, last)}
        if first == 0:
            parts["model.embed_tokens."] = inner.embed_tokens
        if last == n:
            parts["model.norm."] = inner.norm
        prefixes = tuple(parts)
        tensors = read_tensors(model_dir, lambda name: name.startswith(prefixes))
        for prefix, module in parts.items():
            state = {k[len(prefix):]: v.to(dtype) for k, v in tensors.items() if k.startswith(prefix)}
            expected = set(module.state_dict())
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            if missing or unexpected:  # not this architecture, or a damaged checkpoint
                raise ModelError(f"runtime.model: {model_dir}: tensors under {prefix!r} do not fit "
                                 f"{type(module).__name__}: missing {missing}, unexpected {unexpected}")  # fmt: skip
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as e:  # a shape that does not fit
                raise ModelError(f"runtime.model: {model_dir}: tensors under {prefix!r}: {e}".replace("\n", " ")) from e
            if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
                raise ModelError(f"runtime.model: {model_dir}: {prefix!r} left without some weights")
        built = cls(config, nn.ModuleList(inner.layers[first:last]),
                    embed=parts.get("model.embed_tokens."), norm=parts.get("model.norm."))  # fmt: skip
        return built.to(device=device, dtype=dtype)

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
        self.cache = DynamicCache()


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
