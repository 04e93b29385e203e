"""EAGLE-style draft heads: one decoder layer over [next-token embedding ; target feature].

Theory of operation
-------------------
EAGLE drafts at the feature level. The target's last (post-norm) hidden state at position i, f_i,
is what its LM head turns into token i+1. The head reads the pair (embedding of token t_{i+1},
f_i), squeezes it through `fc` (2H → H), runs one Llama decoder layer (without the input norm,
as in EAGLE) and predicts f̂_{i+1}; the target's own LM head turns that into a distribution over
t_{i+2}. Embedding and LM head are the target's, frozen and reused, so a head for SmolLM2-135M has
about 4M parameters of its own.

Checkpoint layout (EAGLE's): a folder with `config.json` (a Llama config for the one layer) and
`model.safetensors` or `pytorch_model.bin` holding `fc.weight` (`fc.bias` when trained with one)
and `layers.0.*`; an `embed_tokens.weight` there is ignored in favour of the target's.

`EagleDrafter` is the core's `Drafter`. Its draft KV cache has one row per position: the committed
rows (t_i, f_{i-1}) with the target's true features, then the tree rows under a tree mask — the
root (t_c, f_{c-1}) and every other node (token, f̂ of its parent). True features come from D0,
which `observe`s every row the last stage returns (prompt rows by position, tree rows by node id);
the committed chain is found by following parent ids from node to node.
"""

from __future__ import annotations

import copy

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from flowspec.tree import DraftTree, FloatArray, IntArray
from runtime import quantized
from runtime.drafters import DraftKV, TopK
from runtime.model_slice import LayerSlice
from runtime.models import DEFAULT_MODEL, ModelError

HEADS = Path(__file__).parent / "heads"  # heads shipped with the project, one folder per target


class EagleHead(nn.Module):
    def __init__(self, config: LlamaConfig, *, bias: bool = True) -> None:
        super().__init__()
        config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
        config._attn_implementation = "sdpa"
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=bias)
        layer = LlamaDecoderLayer(config, layer_idx=0)
        layer.input_layernorm = nn.Identity()  # EAGLE's first layer reads fc's output unnormalised
        self.layers = nn.ModuleList([layer])
        self.draft_vocab: torch.Tensor | None = None  # token ids the head drafts over (None: all)

    def slice(self) -> LayerSlice:
        """A fresh cache-holding runner over this head's layer (shares the weights)."""
        return LayerSlice(self.config, self.layers)

    def fuse(self, embedded: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([embedded, features], dim=-1))


def load_eagle(folder: Path, hidden_size: int) -> EagleHead:
    """An EAGLE checkpoint folder (see the module docstring); errors name the file and the key."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"runtime.draft_model: {folder} has no config.json (an EAGLE checkpoint folder)")
    try:
        config = LlamaConfig(**json.loads(config_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelError(f"{config_path}: not a Llama config ({e})") from None
    if config.hidden_size != hidden_size:
        raise ModelError(f"{config_path}: hidden_size {config.hidden_size}, the target's is {hidden_size}")
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    elif (folder / "pytorch_model.bin").is_file():
        weights = folder / "pytorch_model.bin"
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        raise ModelError(f"runtime.draft_model: {folder} has neither model.safetensors nor pytorch_model.bin")
    state = {k.removeprefix("model."): v for k, v in state.items() if not k.endswith("embed_tokens.weight")}
    draft_vocab = state.pop("draft_vocab", None)
    head = EagleHead(config, bias="fc.bias" in state)
    expected = {k for k in head.state_dict() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - expected - {"layers.0.input_layernorm.weight"})
    if missing or unknown:
        raise ModelError(f"{weights}: missing {missing[:4]}, unknown {unknown[:4]} (not an EAGLE head for this target)")
    if "layers.0.input_layernorm.weight" in state:  # trained with an input norm: keep it
        head.layers[0].input_layernorm = type(head.layers[0].post_attention_layernorm)(
            config.hidden_size, eps=config.rms_norm_eps)  # fmt: skip
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if draft_vocab is not None:
        draft_vocab = draft_vocab.long()
        if draft_vocab.ndim != 1 or not len(draft_vocab) or int(draft_vocab.min()) < 0:
            raise ModelError(f"{weights}: draft_vocab must be a non-empty list of token ids")
        head.draft_vocab = draft_vocab
    return head.eval()


def default_head(target: str, field: str = "runtime.draft_model") -> Path:
    """The head shipped for `target` (only the default model has one); errors name `field`."""
    folder = HEADS / target
    if target != DEFAULT_MODEL or not (folder / "config.json").is_file():
        raise ModelError(f"{field}: no EAGLE head ships for {target!r}; train one with "
                         f"`flowspec train-draft --target {target} --out DIR` and name DIR")  # fmt: skip
    return folder


def save_eagle(head: EagleHead, folder: Path, dtype: torch.dtype = torch.float16,
               draft_vocab: torch.Tensor | None = None) -> None:  # fmt: skip
    """EAGLE's layout; a draft vocabulary (token ids) travels as the extra tensor `draft_vocab`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in head.state_dict().items()}
    draft_vocab = draft_vocab if draft_vocab is not None else head.draft_vocab
    if draft_vocab is not None:
        state["draft_vocab"] = draft_vocab.to(torch.int64).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(head.config.to_dict(), indent=2, default=str))


class FeatureStore:
    """The target's true features for the committed sequence, from the rows D0 saw return."""

    def __init__(self) -> None:
        self.request_id = -1
        self.prompt: dict[int, torch.Tensor] = {}  # position -> feature (prompt rows)
        self.nodes: dict[int, torch.Tensor] = {}  # node id -> feature
        self.child: dict[tuple[int, int], int] = {}  # (parent id, token) -> node id; parent -1 keyed by -1-position
        self.chain: list[int] = []  # node id per committed position (-1: a prompt row)

    def observe(self, request_id: int, node_ids: IntArray, parent_ids: IntArray, tokens: IntArray,
                positions: IntArray, hidden: torch.Tensor, reset: bool) -> None:  # fmt: skip
        if reset or request_id != self.request_id:
            self.__init__()
            self.request_id = request_id
        for r, (node, parent, token, position) in enumerate(
            zip(node_ids.tolist(), parent_ids.tolist(), tokens.tolist(), positions.tolist())
        ):
            if node < 0:
                self.prompt[position] = hidden[r]
                continue
            self.nodes[node] = hidden[r]
            self.child[(parent if parent >= 0 else -1 - position, token)] = node

    def features(self, context: list[int], start: int = 0) -> torch.Tensor:
        """[c - start, H] true features of committed `context` positions start.. (prompt rows, then
        the accepted chain, found by parent ids)."""
        for position in range(len(self.chain), len(context)):  # extend the chain first
            if position in self.prompt:
                self.chain.append(-1)
                continue
            prev = self.chain[position - 1] if position >= 1 else -1
            node = self.child.get((prev, context[position]), -1) if prev >= 0 else -1
            if node < 0:
                node = self.child.get((-1 - position, context[position]), -1)
            if node < 0:
                raise KeyError(f"no returned row for committed position {position} (token {context[position]})")
            self.chain.append(node)
        rows = []
        for position in range(start, len(context)):
            node = self.chain[position]
            rows.append(self.prompt[position] if node < 0 else self.nodes[node])
        return torch.stack(rows)


class EagleDrafter:
    """`full_vocab` drafts over every token even when the head ships a draft vocabulary (whose LM
    head rows cost a fraction of the full head's: SmolLM2's 49k-row head dominates growth time).
    `int8` runs the head's MLP with int8 weights and shortlists its LM head in int8 (`runtime.quantized`)."""

    def __init__(self, head: EagleHead, embed: torch.Tensor, lm_head: torch.Tensor, *, full_vocab: bool = False,
                 int8: bool = False) -> None:  # fmt: skip
        self.head = quantized.int8_copy(head, quantized.DRAFT_INT8_WITHIN) if int8 and quantized.available() else head
        self.embed = embed
        self.vocab = None if full_vocab else head.draft_vocab
        if self.vocab is not None and int(self.vocab.max()) >= lm_head.shape[0]:
            raise ModelError(f"runtime.draft_model: draft_vocab holds token {int(self.vocab.max())}, "
                             f"the target has {lm_head.shape[0]}")  # fmt: skip
        self.top_k = TopK(lm_head if self.vocab is None else lm_head[self.vocab], int8=int8)
        self.vocab_ids = None if self.vocab is None else self.vocab.numpy()  # subset row -> token id
        self.store = FeatureStore()
        self.kv = DraftKV(self.head.slice(), offset=1)  # row i reads (t_i, f_{i-1}): position 0 has none

    def fork(self) -> EagleDrafter:
        """A drafter for another request served at once (a batch lane): the same weights, its own
        features and KV."""
        twin = copy.copy(self)
        twin.store = FeatureStore()
        twin.kv = DraftKV(self.head.slice(), offset=1)
        return twin

    def observe(self, *args, **kwargs) -> None:
        self.store.observe(*args, **kwargs)

    @torch.inference_mode()
    def propose(self, context: IntArray, pool: DraftTree, frontier: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        ctx = [int(t) for t in context]
        first = self.kv.begin(ctx, pool)
        if first < len(ctx):
            f = self.store.features(ctx, first - 1)[:-1]  # f_{first-1} .. f_{c-2}
            self.kv.commit(self.head.fuse(self.embed[torch.tensor(ctx[first:])], f), first, ctx)
        needed = self.kv.missing(pool, frontier)
        depths = pool.depths
        for depth in sorted({int(depths[i]) for i in needed}):  # parents' f̂ first
            rows = np.array([i for i in needed if depths[i] == depth], dtype=np.int64)
            # the root reads the last committed token's true feature, other nodes their parent's f̂
            features = [self.store.features(ctx, len(ctx) - 1)[0] if pool.parents[i] < 0
                        else self.kv.out[int(pool.ids[pool.parents[i]])] for i in rows.tolist()]  # fmt: skip
            self.kv.run(pool, rows, self.head.fuse(self.embed[torch.from_numpy(pool.tokens[rows])], torch.stack(features)))
        tokens, logp = self.top_k(torch.stack([self.kv.out[int(pool.ids[n])] for n in frontier.tolist()]), k)
        return (tokens if self.vocab_ids is None else self.vocab_ids[tokens]), logp
