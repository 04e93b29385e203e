"""The simulated platform: what every device's compute and every link's message costs.

Theory of operation
-------------------
The engine asks a `Platform` five questions and nothing else, so the same engine runs on measured
profiles (`ProfiledPlatform`) and on hand-set constants (`ConstantPlatform`, for exact-timeline
tests and closed-form checks). Ranks: 0 is the draft node D0, 1..N the verification stages.

Links: every device has one egress link. A message occupies its sender's link for
`send_ms` (per-message overhead + bytes at the link's bandwidth) and then travels `latency_ms`
before it is delivered. One link per sender serves messages in order, so delivery between any two
devices is FIFO — as ZeroMQ delivers per peer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from flowspec.config import Scenario
from sim.costs import DeviceProfile, DraftNodeCostModel, LinkCostModel, StageCostModel

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class Platform(Protocol):
    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        """Forward of `n_tokens` rows over `kv_len` cached slots on verification stage `stage`."""
        ...

    def verify_ms(self, n_rows: int) -> float:
        """D0: the target's LM head over `n_rows` returned rows, and the verification itself."""
        ...

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        """D0: `n_calls` drafter forwards over `n_rows` frontier rows in all."""
        ...

    def send_ms(self, src: int, nbytes: int) -> float:
        """How long a message of `nbytes` occupies the sender's link."""
        ...

    def latency_ms(self, src: int, dst: int) -> float:
        """Propagation from `src` to `dst` once the message left the sender's link."""
        ...


@dataclass(frozen=True, slots=True)
class ConstantPlatform:
    """Fixed costs: every stage forward `stage_ms`, every message `send_ms` + `latency_ms`."""

    stage_ms_each: float = 10.0
    verify_ms_each: float = 0.0
    draft_ms_per_call: float = 0.0
    send_ms_each: float = 0.0
    latency_ms_each: float = 2.0

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return self.stage_ms_each

    def verify_ms(self, n_rows: int) -> float:
        return self.verify_ms_each

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return self.draft_ms_per_call * n_calls

    def send_ms(self, src: int, nbytes: int) -> float:
        return self.send_ms_each

    def latency_ms(self, src: int, dst: int) -> float:
        return self.latency_ms_each


def resolve_profile(name: str, profiles_dir: Path = PROFILES_DIR) -> Path:
    """A profile named in a scenario: a path as given if it exists, else under profiles/."""
    path = Path(name)
    return path if path.exists() else profiles_dir / name


class ProfiledPlatform:
    """Costs from measured (or estimated) profiles, for the stages and layer split of a scenario."""

    def __init__(self, scenario: Scenario, profiles_dir: Path = PROFILES_DIR) -> None:
        slowdown = scenario.devices.slowdown
        self._stages = [
            StageCostModel(
                DeviceProfile.load(resolve_profile(name, profiles_dir)),
                n_layers=n_layers,
                first=i == 0,
                last=i == scenario.pipeline.n_stages - 1,
                slowdown=slowdown,
            )
            for i, (name, n_layers) in enumerate(zip(scenario.stage_profiles, scenario.stage_layers))
        ]
        self._d0 = DraftNodeCostModel(DeviceProfile.load(resolve_profile(scenario.devices.draft, profiles_dir)), slowdown=slowdown)
        net = scenario.network
        self._link = LinkCostModel(net.bandwidth_mbps, net.latency_ms, net.overhead_ms)

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return self._stages[stage - 1].forward_ms(n_tokens, kv_len)

    def verify_ms(self, n_rows: int) -> float:
        return self._d0.verify_ms(n_rows)

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return self._d0.draft_ms(n_calls, n_rows, kv_len) if n_calls else 0.0

    def send_ms(self, src: int, nbytes: int) -> float:
        return self._link.overhead_ms + self._link.serialize_ms(nbytes)

    def latency_ms(self, src: int, dst: int) -> float:
        return self._link.latency_ms


def single_device(scenario: Scenario) -> Scenario:
    """`single-sd`'s platform: the whole target on one device (the first stage's profile)."""
    return replace(
        scenario,
        pipeline=replace(scenario.pipeline, n_stages=1, layers=()),
        devices=replace(scenario.devices, per_stage=scenario.stage_profiles[:1]),
    )


class Colocated:
    """A platform whose draft node shares its device with the only stage: messages cost nothing."""

    def __init__(self, inner: Platform) -> None:
        self.inner = inner

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return self.inner.stage_ms(stage, n_tokens, kv_len)

    def verify_ms(self, n_rows: int) -> float:
        return self.inner.verify_ms(n_rows)

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return self.inner.draft_ms(n_calls, n_rows, kv_len)

    def send_ms(self, src: int, nbytes: int) -> float:
        return 0.0

    def latency_ms(self, src: int, dst: int) -> float:
        return 0.0
