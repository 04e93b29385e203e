"""Cost models fed from `profiles/` (schema: profiles/README.md): what the simulator charges and what an emulated runtime pads its compute to.

Theory of operation
-------------------
A `DeviceProfile` is one device/model folder: a complete grid of measured (or estimated) medians
per component, validated on load so that a bad file fails at startup with its name and the
offending column/row/key, never mid-run. Lookups interpolate bilinearly on the grid and refuse to
extrapolate (`OutOfGridError`): a simulator that silently extends a 128-token measurement to 600
tokens would produce confident nonsense. Interpolated values are memoised per integer query,
because the engine asks the same few (n_tokens, kv_len) pairs ~10^5 times per second.

`StageCostModel` and `DraftNodeCostModel` turn a profile into what the engine charges a stage and
the draft node D0: layers, embedding and per-forward overhead on a stage; LM head, drafter
forwards and per-step bookkeeping on D0. Components added to the schema later (`stage_overhead`,
`d0_step`) are optional and cost nothing when absent, so older and estimated profiles keep
loading and mean what they meant. `LinkCostModel` prices a message on a link. `AcceptanceProfile`
is the calibration of the synthetic drafter/target pair. Only numpy and pandas are imported here: this
module is data in, floats out, and must load without simpy or torch.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("flowspec.sim")

STAGE_COLUMNS = ("component", "n_tokens", "kv_len", "dtype", "latency_ms_median", "latency_ms_p10", "latency_ms_p90", "n_samples")
COMPONENTS = ("layer", "embed", "head", "draft", "stage_overhead", "d0_step")
REQUIRED_COMPONENTS = ("layer", "embed", "head")  # the rest are optional: stage-only devices, estimates
KV_FREE = ("embed", "head", "d0_step")  # components whose only kv_len is 0
SOURCES = ("measured", "estimated")
META_KEYS = ("device", "model", "dtype", "source", "method", "date", "n_layers", "hidden_size", "vocab_size")
ACCEPTANCE_COLUMNS = ("depth", "rank", "probability")
ACCEPTANCE_KEYS = ("source", "method", "assumes", "citations")
SUM_TOL = 1e-6


class ProfileError(ValueError):
    """A profile file is missing or does not follow profiles/README.md (user input: exit 2)."""


class OutOfGridError(ProfileError):
    """A cost was asked for outside the profile's grid; we never extrapolate."""


def _read_csv(path: str, columns: tuple[str, ...]) -> pd.DataFrame:
    import pandas as pd  # here, not at the top: a stage process imports this module and never reads a CSV

    """Read every cell as a string so that we, not pandas, decide what a bad value is."""
    if not os.path.isfile(path):
        raise ProfileError(f"{path}: file missing")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not a readable CSV ({e})") from None
    for c in (c for c in columns if c not in df.columns):
        raise ProfileError(f"{path}: column {c} missing")
    for c in (c for c in df.columns if c not in columns):
        raise ProfileError(f"{path}: unexpected column {c!r} (columns are exactly {', '.join(columns)})")
    if df.empty:
        raise ProfileError(f"{path}: no rows")
    return df


def _int(path: str, row: int, col: str, text: str, lo: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ProfileError(f"{path}: row {row}: {col} must be an integer, got {text!r}") from None
    if v < lo:
        raise ProfileError(f"{path}: row {row}: {col} must be >= {lo}, got {v}")
    return v


def _float(path: str, row: int, col: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ProfileError(f"{path}: row {row}: {col} must be a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ProfileError(f"{path}: row {row}: {col} must be finite and >= 0, got {text}")
    return v


def _read_json(path: str, keys: tuple[str, ...]) -> dict:
    if not os.path.isfile(path):
        raise ProfileError(f"{path}: file missing")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ProfileError(f"{path}: must be a JSON object")
    for k in (k for k in keys if k not in meta):
        raise ProfileError(f"{path}: key {k} missing")
    if meta["source"] not in SOURCES:
        raise ProfileError(f"{path}: key source must be measured or estimated, got {meta['source']!r}")
    return meta


@dataclass(frozen=True)
class _Grid:
    """One component's medians on a complete (kv_len x n_tokens) grid, with memoised lookups."""

    file: str
    component: str
    n_axis: tuple[int, ...]
    kv_axis: tuple[int, ...]
    table: np.ndarray  # [len(kv_axis), len(n_axis)] median ms
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def at(self, n_tokens: int, kv_len: int) -> float:
        key = (n_tokens, kv_len)
        v = self._memo.get(key)
        if v is None:
            v = self._memo[key] = self._interpolate(n_tokens, kv_len)
        return v

    def _interpolate(self, n: float, kv: float) -> float:
        ni, nw = self._bracket("n_tokens", self.n_axis, n)
        if len(self.kv_axis) == 1 and self.kv_axis[0] == 0:
            ki, kw = 0, 0.0  # kv-independent component (embed, head, draft not measured by kv)
        else:
            ki, kw = self._bracket("kv_len", self.kv_axis, kv)
        t = self.table

        def along_n(i: int) -> float:
            return t[i, ni] if nw == 0 else t[i, ni] * (1 - nw) + t[i, ni + 1] * nw
        return float(along_n(ki) if kw == 0 else along_n(ki) * (1 - kw) + along_n(ki + 1) * kw)

    def _bracket(self, name: str, axis: tuple[int, ...], x: float) -> tuple[int, float]:
        """Index i and weight w with x = axis[i] * (1 - w) + axis[i+1] * w."""
        if not axis[0] <= x <= axis[-1]:
            raise OutOfGridError(
                f"{self.file}: component {self.component!r}: {name}={x} is outside the grid "
                f"[{axis[0]}, {axis[-1]}]; costs are never extrapolated (extend the profile)")
        i = bisect_right(axis, x) - 1
        if i == len(axis) - 1:
            return (i - 1, 1.0) if i else (0, 0.0)
        return i, (x - axis[i]) / (axis[i + 1] - axis[i])


def _build_grids(path: str, df: pd.DataFrame, meta: dict) -> dict[str, _Grid]:
    points: dict[str, dict[tuple[int, int], float]] = {}
    dtypes = set()
    for i, r in enumerate(df.itertuples(index=False), start=1):
        r = r._asdict()
        comp = r["component"]
        if comp not in COMPONENTS:
            raise ProfileError(f"{path}: row {i}: component must be one of {', '.join(COMPONENTS)}, got {comp!r}")
        n = _int(path, i, "n_tokens", r["n_tokens"], 1)
        kv = _int(path, i, "kv_len", r["kv_len"], 0)
        if comp in KV_FREE and kv != 0:
            raise ProfileError(f"{path}: row {i}: kv_len must be 0 for component {comp!r}, got {kv}")
        if not r["dtype"]:
            raise ProfileError(f"{path}: row {i}: dtype is empty")
        dtypes.add(r["dtype"])
        med, p10, p90 = (_float(path, i, c, r[c]) for c in ("latency_ms_median", "latency_ms_p10", "latency_ms_p90"))
        if med <= 0:
            raise ProfileError(f"{path}: row {i}: latency_ms_median must be > 0, got {med}")
        if not p10 <= med <= p90:
            raise ProfileError(f"{path}: row {i}: need latency_ms_p10 <= latency_ms_median <= latency_ms_p90, "
                               f"got {p10}, {med}, {p90}")
        _int(path, i, "n_samples", r["n_samples"], 1 if meta["source"] == "measured" else 0)
        pts = points.setdefault(comp, {})
        if (n, kv) in pts:
            raise ProfileError(f"{path}: row {i}: duplicate point component {comp!r} n_tokens={n} kv_len={kv}")
        pts[(n, kv)] = med
    if len(dtypes) > 1:
        raise ProfileError(f"{path}: column dtype must hold one value, got {sorted(dtypes)}")
    if dtypes != {meta["dtype"]}:
        raise ProfileError(f"{path}: column dtype is {dtypes.pop()!r} but meta.json says {meta['dtype']!r}")
    for comp in (c for c in REQUIRED_COMPONENTS if c not in points):
        raise ProfileError(f"{path}: component {comp!r} missing (required: {', '.join(REQUIRED_COMPONENTS)})")
    grids = {}
    for comp, pts in points.items():
        ns, kvs = sorted({n for n, _ in pts}), sorted({kv for _, kv in pts})
        table = np.empty((len(kvs), len(ns)))
        for a, kv in enumerate(kvs):
            for b, n in enumerate(ns):
                if (n, kv) not in pts:
                    raise ProfileError(f"{path}: component {comp!r} has no point at kv_len={kv} for n_tokens={n}: "
                                       f"the grid must be complete (every n_tokens {ns} at every kv_len {kvs})")
                table[a, b] = pts[(n, kv)]
        grids[comp] = _Grid(path, comp, tuple(ns), tuple(kvs), table)
    return grids


@dataclass(frozen=True)
class DeviceProfile:
    """One `profiles/<device>/<model>/` folder: `meta` is its card, lookups are median ms."""

    path: str
    meta: dict
    grids: dict[str, _Grid] = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceProfile:
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise ProfileError(f"{folder}: profile folder missing")
        meta_path = os.path.join(folder, "meta.json")
        meta = _read_json(meta_path, META_KEYS)
        for k in ("torch_version", "transformers_version") if meta["source"] == "measured" else ():
            if k not in meta:
                raise ProfileError(f"{meta_path}: key {k} missing (required when source is measured)")
        for k in ("n_layers", "hidden_size", "vocab_size", "threads"):
            if k in meta and (not isinstance(meta[k], int) or isinstance(meta[k], bool) or meta[k] < 1):
                raise ProfileError(f"{meta_path}: key {k} must be a positive integer, got {meta[k]!r}")
        csv_path = os.path.join(folder, "stage_forward.csv")
        grids = _build_grids(csv_path, _read_csv(csv_path, STAGE_COLUMNS), meta)
        log.info("loaded profile %s: device=%s model=%s source=%s grid=%s", folder, meta["device"],
                 meta["model"], meta["source"],
                 ", ".join(f"{c} {len(g.n_axis)}x{len(g.kv_axis)}" for c, g in grids.items()))
        return cls(folder, meta, grids)

    @property
    def source(self) -> str:
        return self.meta["source"]

    def _grid(self, component: str) -> _Grid:
        if component not in self.grids:
            raise ProfileError(f"{self.path}: component {component!r} not in this profile")
        return self.grids[component]

    def layer_ms(self, n_tokens: int, kv_len: int) -> float:
        return self._grid("layer").at(n_tokens, kv_len)

    def embed_ms(self, n_tokens: int) -> float:
        return self._grid("embed").at(n_tokens, 0)

    def head_ms(self, n_tokens: int) -> float:
        return self._grid("head").at(n_tokens, 0)

    def draft_ms(self, n_tokens: int, kv_len: int = 0) -> float:
        return self._grid("draft").at(n_tokens, kv_len)

    def has(self, component: str) -> bool:
        return component in self.grids

    def stage_overhead_ms(self, n_tokens: int, kv_len: int) -> float:
        return self._grid("stage_overhead").at(n_tokens, kv_len)

    def d0_step_ms(self, tree_size: int) -> float:
        return self._grid("d0_step").at(tree_size, 0)


def _check_slowdown(slowdown: float) -> None:
    if not (math.isfinite(slowdown) and slowdown > 0):
        raise ValueError(f"slowdown must be finite and > 0, got {slowdown}")


@dataclass(frozen=True)
class StageCostModel:
    """A verification stage holding `n_layers` target layers (plus the embedding if `first`).

    A profile with `stage_overhead` adds it once per forward, whatever the layers held (the mask,
    rotary and wire work a stage does around its layers); one without it charges layers only.
    `last` adds nothing to a forward: the final RMSNorm is negligible next to a layer, and the
    target's LM head is charged apart (`head_ms`), on D0 as in the FlowSpec reference
    (`DraftNodeCostModel.verify_ms`) or here with `pipeline.head: last`."""

    profile: DeviceProfile
    n_layers: int
    first: bool
    last: bool
    slowdown: float = 1.0
    _memo: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        _check_slowdown(self.slowdown)

    def forward_ms(self, n_tokens: int, kv_len: int) -> float:
        key = (n_tokens, kv_len)
        v = self._memo.get(key)
        if v is None:
            p = self.profile
            v = self.n_layers * p.layer_ms(n_tokens, kv_len) + (p.embed_ms(n_tokens) if self.first else 0.0)
            if p.has("stage_overhead"):
                v += p.stage_overhead_ms(n_tokens, kv_len)
            v = self._memo[key] = v * self.slowdown
        return v

    def head_ms(self, n_rows: int) -> float:
        """The target's LM head over `n_rows` rows on this stage's device (`pipeline.head: last`)."""
        return self.profile.head_ms(n_rows) * self.slowdown if n_rows else 0.0


@dataclass(frozen=True)
class DraftNodeCostModel:
    """The draft node D0: drafter forwards and the target LM head over rows returned for verification."""

    profile: DeviceProfile
    slowdown: float = 1.0

    def __post_init__(self) -> None:
        _check_slowdown(self.slowdown)

    def verify_ms(self, n_rows: int) -> float:
        """LM head (final norm + logits) over the `n_rows` hidden states the last stage returned."""
        return self.profile.head_ms(n_rows) * self.slowdown if n_rows else 0.0

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        """`n_calls` drafter forwards over `n_rows` frontier rows in all.

        The core reports only these totals, not the rows of each call, so every call is charged
        ceil(n_rows / n_calls) rows. The draft curve is concave-ish in rows (flat, then linear), so
        equal splitting slightly over-charges unequal expansions; it is exact for EAGLE-2's
        fixed-width beams."""
        if n_calls <= 0:
            return 0.0
        return n_calls * self.profile.draft_ms(max(1, -(-n_rows // n_calls)), kv_len) * self.slowdown

    def step_ms(self, tree_size: int) -> float:
        """D0's own bookkeeping for one verification step on a tree of `tree_size` nodes (verify,
        prune, re-root, merge, segment; the drafter's forwards excluded). A profile without
        `d0_step` charges 0, as the simulator did before profiles measured it."""
        if not self.profile.has("d0_step"):
            return 0.0
        return self.profile.d0_step_ms(max(1, tree_size)) * self.slowdown


@dataclass(frozen=True)
class LinkCostModel:
    """A link: per-message overhead, serialization at `bandwidth_mbps`, propagation `latency_ms`."""

    bandwidth_mbps: float
    latency_ms: float
    overhead_ms: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0):
            raise ValueError(f"bandwidth_mbps must be finite and > 0, got {self.bandwidth_mbps}")
        for name, v in (("latency_ms", self.latency_ms), ("overhead_ms", self.overhead_ms)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")

    def serialize_ms(self, nbytes: int) -> float:
        # Mbps = 10^6 bit/s = 10^3 bit/ms
        return nbytes * 8 / (self.bandwidth_mbps * 1000.0)

    def transfer_ms(self, nbytes: int) -> float:
        return self.overhead_ms + self.serialize_ms(nbytes) + self.latency_ms


@dataclass(frozen=True)
class AcceptanceProfile:
    """P[target's token is the drafted child of rank r | depth d]; the last entry is "none of them"."""

    path: str
    card: dict
    rank_probs: dict[int, np.ndarray]  # depth -> [p(rank 0), ..., p(rank k-1), p(none)]

    @classmethod
    def load(cls, path: str | os.PathLike) -> AcceptanceProfile:
        csv_path = os.fspath(path)
        card = _read_json(os.path.splitext(csv_path)[0] + ".json", ACCEPTANCE_KEYS)
        df = _read_csv(csv_path, ACCEPTANCE_COLUMNS)
        by_depth: dict[int, dict[int, float]] = {}
        for i, r in enumerate(df.itertuples(index=False), start=1):
            d = _int(csv_path, i, "depth", r.depth, 1)
            rank = _int(csv_path, i, "rank", r.rank, -1)
            p = _float(csv_path, i, "probability", r.probability)
            if p > 1:
                raise ProfileError(f"{csv_path}: row {i}: probability must be <= 1, got {p}")
            ranks = by_depth.setdefault(d, {})
            if rank in ranks:
                raise ProfileError(f"{csv_path}: row {i}: duplicate rank {rank} at depth {d}")
            ranks[rank] = p
        depths = sorted(by_depth)
        if depths != list(range(1, len(depths) + 1)):
            raise ProfileError(f"{csv_path}: depths must be contiguous from 1, got {depths}")
        k = len(by_depth[1]) - 1
        probs = {}
        for d in depths:
            ranks = by_depth[d]
            if sorted(ranks) != list(range(-1, k)):
                raise ProfileError(f"{csv_path}: depth {d}: ranks must be -1 and 0..{k - 1} (as at depth 1), "
                                   f"got {sorted(ranks)}")
            arr = np.array([ranks[r] for r in range(k)] + [ranks[-1]])
            if abs(arr.sum() - 1.0) > SUM_TOL:
                raise ProfileError(f"{csv_path}: depth {d}: probabilities sum to {arr.sum():.9f}, not 1")
            arr.setflags(write=False)  # shared with every caller: must not be edited in place
            probs[d] = arr
        log.info("loaded acceptance profile %s: source=%s depths=%d ranks=%d", csv_path, card["source"], len(depths), k)
        return cls(csv_path, card, probs)

    @property
    def source(self) -> str:
        return self.card["source"]

    @property
    def max_depth(self) -> int:
        return len(self.rank_probs)

    @property
    def n_ranks(self) -> int:
        return len(self.rank_probs[1]) - 1

    def for_depth(self, depth: int) -> np.ndarray:
        """Rank probabilities at `depth`; deeper than profiled reuses the deepest row."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        return self.rank_probs[min(depth, self.max_depth)]

    def expected_accepted(self, n_nodes: int, max_depth: int, top_k: int) -> float:
        """Expected accepted drafts (bonus token excluded) of the top_k-ary, depth <= max_depth tree
        cut to its n_nodes most probable nodes, as EAGLE-2 builds it from a calibrated drafter.
        With depths independent a node's path probability is the product of its ranks'; the tree
        is ancestor-closed, so E[accepted] = sum of path probabilities over its nodes."""
        k = min(top_k, self.n_ranks)
        heap = [(-self.for_depth(1)[r], 1) for r in range(k)]
        total, taken = 0.0, 0
        while heap and taken < n_nodes:
            neg_p, d = heapq.heappop(heap)
            total, taken = total - neg_p, taken + 1
            if d < max_depth:
                for r in range(k):
                    heapq.heappush(heap, (neg_p * self.for_depth(d + 1)[r], d + 1))
        return total
