"""Where a verification stage sits: its rank and layers, where it listens, whom it reports to.

A plan is all a stage process is told before it starts: the launcher's children build theirs from
the resolved scenario and D0's loopback address (`loopback_plan`), a testbed board from the
scenario's `runtime.hosts` and `base_port` (`testbed_plan`). Both come from one `_plan`, so a
board and a loopback child of the same scenario hold the same layers, device, dtype and keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowspec.config import HeadPlacement, Scenario
from runtime.security import Keyring, keyring_for, peer_addresses


@dataclass(frozen=True, slots=True)
class StagePlan:
    rank: int  # 1..N
    n_stages: int
    first_layer: int  # 0-based, inclusive
    last_layer: int  # exclusive
    d0_address: str
    host: str  # the address peers reach this stage at
    port: int  # 0: any free port
    bind_host: str | None  # None: bind on `host`
    timeout_s: float
    startup_timeout_s: float
    device: str  # runtime.device (or this stage's override)
    dtype: str  # the stage's weights, and its hidden states on the wire
    watch_parent: bool  # exit if the launcher that started us goes away (loopback runs)
    head: bool = False  # the last stage with `pipeline.head: last`: it computes the target's decisions
    sampled: bool = False  # temperature > 0: it returns logits, not argmax ids
    features: bool = True  # it returns hidden states (always, unless `head` and D0's drafter does not read them)
    keyring: Keyring | None = None  # runtime.security: curve
    allowed: tuple[str, ...] = ()  # the IPs its inbox hears (a testbed's hosts); empty: any


def layer_ranges(scenario: Scenario) -> list[tuple[int, int]]:
    """[first, last) of every stage's layers, V1 first."""
    bounds = np.concatenate([[0], np.cumsum(scenario.stage_layers)]).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def loopback_plan(scenario: Scenario, rank: int, d0: str) -> StagePlan:
    """Stage `rank` as the launcher's child: on 127.0.0.1, any free port, gone when the launcher is."""
    return _plan(scenario, rank, d0, "127.0.0.1", 0, None, watch_parent=True)


def testbed_plan(scenario: Scenario, rank: int) -> StagePlan:
    """Where stage `rank` listens and whom it reports to, from `runtime.hosts` and `base_port`; it
    hears the hosts only. runtime.keys must be resolved already (`runtime.security.with_keys_resolved`)."""
    rt = scenario.runtime
    return _plan(scenario, rank, f"tcp://{rt.hosts[0]}:{rt.base_port}", rt.hosts[rank], rt.base_port + rank, "0.0.0.0",
                 watch_parent=False, allowed=peer_addresses(rt.hosts))  # fmt: skip


def _plan(scenario: Scenario, rank: int, d0: str, host: str, port: int, bind_host: str | None,
          watch_parent: bool, allowed: tuple[str, ...] = ()) -> StagePlan:  # fmt: skip
    rt = scenario.runtime
    first, last = layer_ranges(scenario)[rank - 1]
    head = rank == scenario.pipeline.n_stages and scenario.pipeline.head is HeadPlacement.LAST
    return StagePlan(rank, scenario.pipeline.n_stages, first, last, d0, host, port, bind_host, rt.timeout_s,
                     rt.startup_timeout_s, *scenario.stage_compute(rank), watch_parent=watch_parent, head=head,
                     sampled=scenario.decoding.temperature > 0, features=not head or scenario.features_on_the_wire,
                     keyring=keyring_for(scenario, rank), allowed=allowed)  # fmt: skip
