"""The device profiler behind `flowspec profile device`: what this device costs the runtime.

Theory of operation
-------------------
Every number times the code the runtime executes, on the device and dtype it will use, so that a
simulation fed the profile charges what a run would spend:

- `layer`, `stage_overhead`: a `LayerSlice` holding every decoder layer runs one segment through
  the stage's own forward (additive mask from a visibility matrix, rotary, explicit positions)
  over a KV cache of `kv_len` random entries, cropped back after each call. The same forward over
  a slice with no layers is the fixed part; `layer` is (full - fixed) / n_layers, so a stage of k
  layers costs k * layer + stage_overhead. `stage_overhead` is everything a stage does per
  forward besides its layers: the ledger's visibility matrix, the fixed part, and its hidden
  states decoded from and encoded for the wire (the transfer itself is the link's).
- `embed`: the first stage's embedding of n token ids.
- `head`: what D0 does with n returned rows before the core sees them (`DraftNode._on_message`):
  hidden states from the wire, the final norm, `h @ lm_head.T`, argmax, and the drafter's
  `observe` when it has one (EAGLE's feature store).
- `draft`: the drafter `runtime.launcher.make_drafter` builds for the options (by default the
  shipped EAGLE head over its draft vocabulary with prompt lookup merged in), timed through its
  real `propose` over n frontier rows one level below a root it has already run, after a
  committed context of `kv_len` tokens: one step of EAGLE-2 growth.
- `d0_step`: `PipelineCore.handle` for a returned segment that led to commands, plus the
  `DraftDone` that follows it, minus the drafter's time (`TimedDrafter`), on an in-memory
  pipeline with a cheap oracle drafter. Keyed by the larger tree size seen across the event,
  exactly as `sim.engine` charges it.

Samples are taken round-robin over a component's grid points (grouped where switching points
costs untimed work, e.g. a drafter's new context), so a burst of foreign load on a shared machine
spreads over the curve instead of bending one point. `--budget-s` is split over the components;
each warms every point, then takes as many samples as fit (3 to 25), thinning interior grid
values when even 3 would not fit, and says so in the card. Rule: this module measures and writes
the schema of profiles/README.md; `flowspec.costs` validates it.
"""

from __future__ import annotations

import gc
import math
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowspec.config import DrafterKind, ModelConfig, RuntimeConfig, Scenario, TreeConfig
from flowspec.kv import StageLedger
from flowspec.messages import Segment, SegmentKind
from flowspec.tree import DraftTree
from runtime import wire
from runtime.llama import KVCache, LlamaShape
from runtime.model_slice import LayerSlice, hidden_from_wire, hidden_to_wire
from runtime.models import Echo, ModelError, quiet, torch_device
from runtime.profile_card import card, write
from runtime.profiling import Budget, Point, Timer, d0_steps, sample_points, summarize

DEVICES = ("cpu", "cuda", "mps", "auto")
DTYPES = ("float32", "float16", "bfloat16")
SHARES = {"stage_overhead": 0.06, "embed": 0.03, "head": 0.09, "draft": 0.22, "d0_step": 0.15, "layer": 0.45}


class ProfileOptionError(ModelError):
    """An option of `flowspec profile device` is unusable here (bad input: exit code 2). A kind of
    ModelError, so the CLI reports it as bad input without importing this torch-heavy module."""


def _axis(key: str, text: str, lo: int) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise ProfileOptionError(f"--grid {key}: expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < lo:
        raise ProfileOptionError(f"--grid {key}: values must be integers >= {lo}, got {text!r}")
    return values


@dataclass(frozen=True)
class Grid:
    """The points measured; each axis ascending. `draft_context` >= 1: a drafter always has one."""

    n_tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)  # layer, stage_overhead, embed, head
    kv_len: tuple[int, ...] = (0, 128, 512, 1024, 2048)  # layer, stage_overhead
    draft_rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    draft_context: tuple[int, ...] = (2, 128, 512, 2048)  # a 1-token context re-runs the root every call
    tree_size: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

    def with_specs(self, specs: Sequence[str]) -> Grid:
        """This grid with `KEY=V1,V2,...` specs applied, e.g. `kv_len=0,64`."""
        known = {f.name: 0 if f.name == "kv_len" else 1 for f in fields(self)}
        changes = {}
        for spec in specs:
            key, sep, text = spec.partition("=")
            if not sep or key.strip() not in known:
                raise ProfileOptionError(f"--grid {spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(known)}")
            changes[key.strip()] = _axis(key.strip(), text, known[key.strip()])
        return replace(self, **changes)


@dataclass(frozen=True)
class ProfileOptions:
    out: Path
    model: str = RuntimeConfig().model
    drafter: str = str(RuntimeConfig().drafter)
    draft_model: str | None = None
    device: str = "cpu"  # what the runtime's stages use today; `auto` picks cuda, then mps, then cpu
    dtype: str = ModelConfig().dtype
    threads: int = RuntimeConfig().torch_threads
    budget_s: float = 300.0
    grid: Grid = field(default_factory=Grid)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ProfileOptionError(f"--device: unknown device {self.device!r} (known: {', '.join(DEVICES)})")
        if self.dtype not in DTYPES:
            raise ProfileOptionError(f"--dtype: unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        if self.drafter not in {str(k) for k in DrafterKind}:
            raise ProfileOptionError(f"--drafter: unknown drafter {self.drafter!r} "
                                     f"(known: {', '.join(str(k) for k in DrafterKind)})")  # fmt: skip
        if not (math.isfinite(self.budget_s) and self.budget_s > 0):
            raise ProfileOptionError(f"--budget-s must be > 0, got {self.budget_s}")
        if self.threads < 1:
            raise ProfileOptionError(f"--threads must be >= 1, got {self.threads}")

    @property
    def command_line(self) -> str:
        """The command that repeats this measurement, every option spelled out (for the card)."""
        options = {"model": self.model, "drafter": self.drafter, "draft-model": self.draft_model,
                   "device": self.device, "dtype": self.dtype, "threads": self.threads, "budget-s": self.budget_s}
        words = [f"--{k} {shlex.quote(str(v))}" for k, v in options.items() if v is not None]
        words += [f"--grid {f.name}={','.join(map(str, getattr(self.grid, f.name)))}" for f in fields(self.grid)]
        return " ".join(["flowspec profile device", *words, f"--out {shlex.quote(str(self.out))}"])


@dataclass(frozen=True)
class Profile:
    rows: list[dict]
    meta: dict
    out: Path


def profile_device(opts: ProfileOptions, *, echo: Echo = quiet) -> Profile:
    """Measure every component (see the module docstring) and write `opts.out`."""
    device = torch_device(opts.device, f"--device {opts.device}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    try:
        target, drafter, scenario = _load(opts, echo)
        model = target.model.to(device=device, dtype=getattr(torch, opts.dtype)).eval()
        budget = Budget(opts.budget_s, SHARES)
        timer = Timer(device)
        measured = Measurement(model, drafter, scenario, opts, device, timer, budget, echo)
        rows = measured.run()
    finally:
        torch.set_num_threads(threads_before)
    meta = card(opts, device, target.model_dir, scenario, measured, load_start, time.perf_counter() - t_start)
    write(opts.out, rows, meta)
    return Profile(rows, meta, opts.out)


def _load(opts: ProfileOptions, echo: Echo):
    """The target and the drafter exactly as `flowspec run` builds them for these options."""
    from runtime.launcher import Target, make_drafter

    rt = RuntimeConfig(model=opts.model, drafter=DrafterKind(opts.drafter), draft_model=opts.draft_model)
    scenario = Scenario(name="profile", runtime=rt)
    try:
        target = Target.load(scenario, echo=echo)
        drafter = make_drafter(target.scenario, target)
    except ModelError as e:  # the runtime names scenario keys; here they are options
        text = str(e).replace("runtime.draft_model", "--draft-model").replace("runtime.model", "--model")
        raise ModelError(text) from None
    return target, drafter, target.scenario


class Measurement:
    """The components of one profile, measured in order; `notes` says what the budget changed."""

    def __init__(self, model, drafter, scenario: Scenario, opts: ProfileOptions, device: torch.device,
                 timer: Timer, budget: Budget, echo: Echo) -> None:  # fmt: skip
        self.model, self.drafter, self.scenario, self.opts = model, drafter, scenario, opts
        self.device, self.dtype, self.timer, self.budget, self.echo = device, getattr(torch, opts.dtype), timer, budget, echo
        self.config = model.config
        self.hidden = model.config.hidden_size
        self.n_layers = model.config.num_hidden_layers
        self.notes: list[str] = []
        self.axes: dict[str, dict[str, list[int]]] = {}
        self.k = min(TreeConfig().topk, scenario.model.vocab_size - 1)

    def run(self) -> list[dict]:
        """Every component; `layer` last, so it gets whatever time the others left unused."""
        dtype, fixed = self.opts.dtype, {}
        with _collector_off():
            rows = summarize("stage_overhead", self._sample("stage_overhead", self._overhead_points(fixed)), dtype)
            rows += summarize("embed", self._sample("embed", self._embed_points()), dtype)
            rows += summarize("head", self._sample("head", self._head_points()), dtype)
            rows += summarize("draft", self._sample("draft", self._draft_points()), dtype)
        steps, note = d0_steps(self.opts.grid.tree_size, self.budget.phase("d0_step"), dtype)
        self._note("d0_step", note, sorted({r["n_tokens"] for r in steps}), [0])
        with _collector_off():
            rows = self._layer_rows(self._sample("layer", self._layer_points()), fixed) + rows
        return rows + steps

    def _sample(self, component: str, points: list[Point]) -> dict[tuple[int, int], list[float]]:
        samples, note = sample_points(component, points, self.budget.phase(component), self.timer)
        self._note(component, note, sorted({n for n, _ in samples}), sorted({kv for _, kv in samples}))
        return samples

    def _note(self, component: str, note: str, n_axis: list[int], kv_axis: list[int]) -> None:
        self.axes[component] = {"n_tokens": n_axis, "kv_len": kv_axis}
        if note:
            self.notes.append(f"{component}: {note}")
            self.echo(f"{component}: {note}")

    # ---- stages ---------------------------------------------------------------------------------

    def _tensor(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def _cache(self, n_layers: int, kv: int) -> KVCache:
        """A cache holding `kv` random entries per layer: attention costs the same whatever they hold,
        and it spares a prefill of `kv` tokens per grid value."""
        cache, cfg = KVCache(), self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for i in range(n_layers if kv else 0):
            cache.update(self._tensor(1, cfg.num_key_value_heads, kv, head_dim),
                         self._tensor(1, cfg.num_key_value_heads, kv, head_dim), i)  # fmt: skip
        return cache

    def _visible(self, n: int, kv: int) -> torch.Tensor:
        """[n, kv + n]: the cache, then causal among the rows (a chain costs what a tree does)."""
        visible = torch.ones(n, kv + n, dtype=torch.bool)
        visible[:, kv:] = torch.tril(visible[:, kv:])
        return visible.to(self.device)

    def _layer_points(self) -> list[Point]:
        full = LayerSlice.from_model(self.model, 0, self.n_layers, layers_only=True).to(self.device)  # every layer, as a stage runs them
        points = []
        for kv in self.opts.grid.kv_len:
            cache = self._cache(self.n_layers, kv)
            for n in self.opts.grid.n_tokens:
                h, pos, vis = self._tensor(n, self.hidden), torch.arange(kv, kv + n, device=self.device), self._visible(n, kv)

                def prepare(cache=cache, kv=kv) -> None:
                    full.cache = cache
                    if full.kv_len > kv:
                        cache.crop(kv - full.kv_len)
                points.append(Point(n, kv, lambda h=h, pos=pos, vis=vis: full(h, pos, vis), prepare))
        return points

    def _overhead_points(self, fixed: dict[tuple[int, int], list[float]]) -> list[Point]:
        """A stage's work per forward besides its layers; the slice's own part also goes to `fixed`
        for `layer` to subtract (every point, warm-up included, so each has one, thinned or not)."""
        empty = LayerSlice(LlamaShape.of(self.model.config), nn.ModuleList()).to(self.device)
        wire_dtype = self.opts.dtype
        points = []
        for n, kv in ((n, kv) for kv in self.opts.grid.kv_len for n in self.opts.grid.n_tokens):
            ledger, seg = _ledger_and_segment(n, kv)
            frames = wire.encode_segment(seg, 1, hidden_to_wire(torch.randn(n, self.hidden), wire_dtype), wire_dtype)
            cache = KVCache()
            if kv:  # one placeholder layer, so the empty slice sees kv_len cached positions
                cache.update(torch.zeros(1, 1, kv, 1, device=self.device), torch.zeros(1, 1, kv, 1, device=self.device), 0)

            def call(frames=frames, ledger=ledger, cache=cache, key=(n, kv)) -> None:
                msg = wire.decode(frames)
                s = wire.to_segment(msg)
                x = hidden_from_wire(msg.arrays["hidden"], msg.dtypes["hidden"]).to(self.device, self.dtype)
                visible = torch.from_numpy(ledger.visibility(s)).to(self.device)
                positions = torch.from_numpy(s.positions).to(self.device)
                empty.cache = cache
                t = time.perf_counter()
                out = empty(x, positions, visible)
                self.timer.sync()
                fixed.setdefault(key, []).append((time.perf_counter() - t) * 1000.0)  # ms, as samples are
                wire.encode_segment(s, 2, hidden_to_wire(out.to("cpu"), wire_dtype), wire_dtype)
            points.append(Point(n, kv, call))
        return points

    def _layer_rows(self, raw: dict, fixed: dict) -> list[dict]:
        """(full forward - the slice's fixed part) / n_layers, per sample."""
        per_layer = {key: [(t - float(np.median(fixed[key]))) / self.n_layers for t in ts] for key, ts in raw.items()}
        return summarize("layer", per_layer, self.opts.dtype)

    def _embed_points(self) -> list[Point]:
        embed = self.model.get_input_embeddings()
        rng = np.random.default_rng(0)
        points = []
        for n in self.opts.grid.n_tokens:
            ids = rng.integers(0, self.scenario.model.vocab_size, n)
            points.append(Point(n, 0, lambda ids=ids: embed(torch.from_numpy(ids).to(self.device))))
        return points

    def _head_points(self) -> list[Point]:
        norm, lm_head = self.model.model.norm, self.model.get_output_embeddings().weight
        observe = getattr(self.drafter, "observe", None)
        points = []
        for n in self.opts.grid.n_tokens:
            arrived = hidden_to_wire(torch.randn(n, self.hidden), self.opts.dtype)
            ids = np.arange(n, dtype=np.int64)

            def call(arrived=arrived, ids=ids) -> None:
                h = hidden_from_wire(arrived, self.opts.dtype)
                (norm(h.to(self.device, self.dtype)) @ lm_head.T).argmax(dim=-1).to("cpu").numpy()
                if observe is not None:
                    observe(0, ids, ids - 1, ids, ids, h, False)
            points.append(Point(n, 0, call))
        return points

    # ---- the drafter ----------------------------------------------------------------------------

    def _draft_points(self) -> list[Point]:
        rng = np.random.default_rng(0)
        vocab = self.scenario.model.vocab_size
        points = []
        ids = iter(range(10**9))  # fresh node ids: a new root each sample, so the drafter re-runs nothing
        for c in self.opts.grid.draft_context:
            context = (rng.zipf(1.3, c) - 1) % vocab  # text-like: frequent tokens repeat, lookup finds matches
            features = torch.randn(c, self.hidden)  # what D0 observed for the prompt rows

            def enter(context=context, features=features) -> None:
                observe = getattr(self.drafter, "observe", None)
                if observe is not None:
                    rows = np.full(len(context), -1, dtype=np.int64)
                    observe(0, rows, rows, context, np.arange(len(context)), features, True)
            for n in self.opts.grid.draft_rows:
                tokens = np.concatenate([[rng.integers(vocab)], rng.choice(vocab, n, replace=n > vocab)])
                state = {}

                def prepare(context=context, tokens=tokens, n=n, state=state) -> None:
                    first = next(ids)
                    root = DraftTree(np.array([first]), tokens[:1], np.array([-1]), np.array([len(context)]), np.zeros(1))
                    self.drafter.propose(context, root, np.array([0]), self.k)  # runs the root: untimed
                    state["pool"] = DraftTree(first + np.arange(n + 1), tokens, np.array([-1] + [0] * n),
                                              len(context) + np.array([0] + [1] * n), -np.arange(n + 1) / 10.0)  # fmt: skip

                def call(context=context, n=n, state=state) -> None:
                    self.drafter.propose(context, state["pool"], np.arange(1, n + 1), self.k)
                points.append(Point(n, c, call, prepare, group=c, enter=enter))
        return points


@contextmanager
def _collector_off() -> Iterator[None]:
    """No garbage collection inside timed forwards: a collection there is noise, not model cost."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _ledger_and_segment(n: int, kv: int) -> tuple[StageLedger, Segment]:
    """A ledger with `kv` committed slots and a tree segment of n rows (4 children per node)."""
    ledger = StageLedger()
    if kv:
        prompt = np.full(kv, -1, dtype=np.int64)
        ledger.append(Segment(0, -1, 0, SegmentKind.PREFILL, prompt, np.zeros(kv, dtype=np.int64), prompt,
                              np.arange(kv), 0, reset=True))  # fmt: skip
    ids = np.arange(n, dtype=np.int64)
    parents = np.where(ids > 0, (ids - 1) // 4, -1)
    depth = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
    return ledger, Segment(0, 0, 1, SegmentKind.TREE, ids, ids % 7, parents, kv + depth, 0)
