"""Links of the simulator: what a message of `nbytes` costs on one device's egress link.

Theory of operation
-------------------
The engine sees a link as two numbers per message (see `flowspec.platform`): `send_ms(nbytes)`, how
long the message occupies the sender's link (later messages from that sender wait behind it), and
`latency_ms`, how long it then travels before delivery. A link is given either by numbers
(`RatedLink`: per-message overhead plus bytes at a bandwidth, then a fixed latency) or by a
measured **link profile** (`LinkProfile`, a folder written by `flowspec profile link`; schema in
profiles/README.md, "Link profile"), which `ProfiledLink` prices:

- one-way time of an isolated message, `LinkProfile.one_way_ms_at(nbytes)`: the medians, interpolated
  linearly in `nbytes`. Below the smallest size it is the smallest size's (small messages cost a
  flat per-message time). Above the largest size it grows at the throughput measured at the
  largest size, the link's asymptotic bandwidth; the first such message logs a warning, since the
  profile then stands for sizes it never saw.
- propagation, `latency_ms`, the part that does not hold the link and is the same for every
  size: the median over the sizes of one-way time minus per-message stream time (size /
  throughput), kept within [0, least one-way time]. A stream overlaps flight time and not link
  time, so each size estimates the flight time; the median is the constant that best reproduces
  the measured streams (least absolute error summed over the grid) and shrugs off a noisy size.
- `send_ms(nbytes)` = one-way time - propagation. So an isolated message is delivered exactly
  at its measured one-way time at every size. Back-to-back messages are priced as well as one
  constant flight time allows: where a link is not one bandwidth plus one latency (loopback,
  where small messages wait on waking the receiver and large ones on copies) some sizes stream
  too slow and others too fast; `ProfiledLink.stream_error` says how far, and is logged at load.

Profiles are validated on load (`ProfileError` naming the file, row, column or key, as in
`flowspec.costs`), never mid-run. Only numpy and pandas are imported: data in, floats out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np

# The readers of flowspec.costs, so that device and link profiles word their errors the same way.
from flowspec.costs import LinkCostModel, ProfileError, _float, _int, _read_csv, _read_json

log = logging.getLogger("flowspec.sim")

TRANSFER_COLUMNS = ("nbytes", "one_way_ms_median", "one_way_ms_p10", "one_way_ms_p90", "n_echoes",
                    "throughput_mbps", "n_streamed")  # fmt: skip
META_KEYS = ("link", "source", "method", "date", "transport")
HOST_KEYS = ("hostname", "cpu_model", "pyzmq_version", "libzmq_version")  # per host, when measured


class Link(Protocol):
    latency_ms: float
    """Propagation once the message has left the sender's link."""

    def send_ms(self, nbytes: int) -> float:
        """How long a message of `nbytes` occupies the sender's link."""
        ...


@dataclass(frozen=True)
class RatedLink:
    """A link given by numbers: overhead + serialization at the bandwidth, then the latency."""

    cost: LinkCostModel

    @property
    def latency_ms(self) -> float:
        return self.cost.latency_ms

    def send_ms(self, nbytes: int) -> float:
        return self.cost.overhead_ms + self.cost.serialize_ms(nbytes)


def _check_meta(path: str, meta: dict) -> None:
    for k in ("link", "method", "transport"):
        if not isinstance(meta[k], str) or not meta[k]:
            raise ProfileError(f"{path}: key {k} must be a non-empty string, got {meta[k]!r}")
    try:
        datetime.fromisoformat(meta["date"])
    except (TypeError, ValueError):
        raise ProfileError(f"{path}: key date must be an ISO date or time, got {meta['date']!r}") from None
    if meta["source"] != "measured":
        return
    for side in ("listener", "peer"):
        host = meta.get(side)
        if not isinstance(host, dict):
            raise ProfileError(f"{path}: key {side} must be an object describing that host (required when source "
                               f"is measured), got {host!r}")  # fmt: skip
        for k in HOST_KEYS:
            if not isinstance(host.get(k), str) or not host[k]:
                raise ProfileError(f"{path}: key {side}.{k} must be a non-empty string, got {host.get(k)!r}")


@dataclass(frozen=True)
class LinkProfile:
    """One `profiles/links/<name>/` folder: one-way medians and throughputs by message size."""

    path: str
    meta: dict
    nbytes: np.ndarray = field(repr=False)  # [n_sizes] strictly increasing
    one_way_ms: np.ndarray = field(repr=False)  # [n_sizes] medians
    throughput_mbps: np.ndarray = field(repr=False)  # [n_sizes]

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinkProfile:
        folder = os.fspath(path)
        if not os.path.isdir(folder):
            raise ProfileError(f"{folder}: link profile folder missing")
        meta_path = os.path.join(folder, "meta.json")
        meta = _read_json(meta_path, META_KEYS)
        _check_meta(meta_path, meta)
        csv_path = os.path.join(folder, "transfer.csv")
        df = _read_csv(csv_path, TRANSFER_COLUMNS)
        min_samples = 1 if meta["source"] == "measured" else 0
        sizes, medians, rates = [], [], []
        for i, r in enumerate(df.itertuples(index=False), start=1):
            n = _int(csv_path, i, "nbytes", r.nbytes, 1)
            if sizes and n <= sizes[-1]:
                raise ProfileError(f"{csv_path}: row {i}: nbytes must increase from row to row, "
                                   f"got {n} after {sizes[-1]}")  # fmt: skip
            p10, med, p90 = (_float(csv_path, i, c, getattr(r, c))
                             for c in ("one_way_ms_p10", "one_way_ms_median", "one_way_ms_p90"))  # fmt: skip
            if med <= 0:
                raise ProfileError(f"{csv_path}: row {i}: one_way_ms_median must be > 0, got {med}")
            if not p10 <= med <= p90:
                raise ProfileError(f"{csv_path}: row {i}: need one_way_ms_p10 <= one_way_ms_median <= one_way_ms_p90, "
                                   f"got {p10}, {med}, {p90}")  # fmt: skip
            rate = _float(csv_path, i, "throughput_mbps", r.throughput_mbps)
            if rate <= 0:
                raise ProfileError(f"{csv_path}: row {i}: throughput_mbps must be > 0, got {rate}")
            _int(csv_path, i, "n_echoes", r.n_echoes, min_samples)
            _int(csv_path, i, "n_streamed", r.n_streamed, min_samples)
            sizes.append(n), medians.append(med), rates.append(rate)
        arrays = [np.array(a, dtype=float) for a in (sizes, medians, rates)]
        for a in arrays:
            a.setflags(write=False)  # shared by every link priced from this profile
        log.info("loaded link profile %s: link=%s source=%s, %d sizes %d..%d B", folder, meta["link"],
                 meta["source"], len(sizes), sizes[0], sizes[-1])  # fmt: skip
        return cls(folder, meta, *arrays)

    @property
    def source(self) -> str:
        return self.meta["source"]

    def stream_ms(self, i: int) -> float:
        """Per-message time of grid size i in a stream: size / throughput."""
        return float(self.nbytes[i] * 8 / (self.throughput_mbps[i] * 1000.0))  # Mbit/s = 1000 bit/ms

    def one_way_ms_at(self, nbytes: int) -> float:
        """Delivery time of an isolated message of `nbytes` (see the module docstring)."""
        top = float(self.nbytes[-1])
        if nbytes > top:
            return float(self.one_way_ms[-1]) + (nbytes - top) * 8 / (float(self.throughput_mbps[-1]) * 1000.0)
        return float(np.interp(nbytes, self.nbytes, self.one_way_ms))  # flat below the smallest size


@dataclass(frozen=True)
class ProfiledLink:
    """A link priced from a `LinkProfile`: one-way time split into link time and propagation."""

    profile: LinkProfile
    latency_ms: float = field(init=False)
    _memo: dict[int, float] = field(default_factory=dict, compare=False, repr=False)
    _warned: list[bool] = field(default_factory=list, compare=False, repr=False)  # beyond the grid, once

    def __post_init__(self) -> None:
        p = self.profile
        flight = float(np.median([float(w) - p.stream_ms(i) for i, w in enumerate(p.one_way_ms)]))
        object.__setattr__(self, "latency_ms", min(max(flight, 0.0), float(p.one_way_ms.min())))
        log.info("link %s: propagation %.4f ms; back-to-back messages priced within %.0f%% of the measured "
                 "stream times", p.path, self.latency_ms, 100 * self.stream_error())  # fmt: skip

    def send_ms(self, nbytes: int) -> float:
        v = self._memo.get(nbytes)
        if v is None:
            if nbytes > self.profile.nbytes[-1] and not self._warned:
                self._warned.append(True)
                log.warning("link profile %s: a %d B message is beyond its largest size (%d B); priced at the "
                            "throughput measured there (%.0f Mbit/s)", self.profile.path, nbytes,
                            int(self.profile.nbytes[-1]), float(self.profile.throughput_mbps[-1]))  # fmt: skip
            v = self._memo[nbytes] = max(0.0, self.profile.one_way_ms_at(nbytes) - self.latency_ms)
        return v

    def stream_error(self) -> float:
        """Largest relative error of the model's per-message stream time (`send_ms`) against the
        measured one over the grid: how far back-to-back messages may be mispriced."""
        p = self.profile
        return max(abs(self.send_ms(int(n)) - p.stream_ms(i)) / p.stream_ms(i) for i, n in enumerate(p.nbytes))
