"""The simulated platform: what every device's compute and every link's message costs.

Theory of operation
-------------------
The engine asks a `Platform` five questions and nothing else, so the same engine runs on measured
profiles (`ProfiledPlatform`) and on hand-set constants (`ConstantPlatform`, for exact-timeline
tests and closed-form checks). Ranks: 0 is the draft node D0, 1..N the verification stages.

Links: every device has one egress link. A message occupies its sender's link for
`send_ms` (per-message overhead + bytes at the link's bandwidth) and then travels `latency_ms`
before it is delivered. One link per sender serves messages in order, so delivery between any two
devices is FIFO — as ZeroMQ delivers per peer. Each device's link is its own (`network.links`:
numbers or a measured link profile, see `flowspec.links`); the ring's hop i -> i+1 and D0's prunes to
every stage are priced on the sender's link.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flowspec.config import HeadPlacement, LinkConfig, Scenario
from flowspec.messages import Command, Draft, Event, SegmentReturned, WireSizes
from flowspec.policy import device_scenario, spec
from flowspec.costs import DeviceProfile, DraftNodeCostModel, LinkCostModel, OutOfGridError, ProfileError, StageCostModel
from flowspec.links import Link, LinkProfile, ProfiledLink, RatedLink

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


class Platform(Protocol):
    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        """Forward of `n_tokens` rows over `kv_len` cached slots on verification stage `stage`."""
        ...

    def verify_ms(self, n_rows: int, device: int = 0) -> float:
        """The target's LM head over `n_rows` rows on `device`: D0 (0) over the rows the last
        stage returned, or the last stage itself (N) with `pipeline.head: last`."""
        ...

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        """D0: `n_calls` drafter forwards over `n_rows` frontier rows in all."""
        ...

    def step_ms(self, tree_size: int) -> float:
        """D0: its own bookkeeping for one verification step (verify, prune, re-root, merge,
        segment) on a tree of `tree_size` nodes, the drafter's forwards excluded."""
        ...

    def send_ms(self, src: int, nbytes: int) -> float:
        """How long a message of `nbytes` occupies the sender's link."""
        ...

    def latency_ms(self, src: int, dst: int) -> float:
        """Propagation from `src` to `dst` once the message left the sender's link."""
        ...


@dataclass(frozen=True, slots=True)
class ConstantPlatform:
    """Fixed costs: every stage forward `stage_ms`, every message `send_ms` + `latency_ms`, every
    D0 verification step `step_ms_each` of bookkeeping."""

    stage_ms_each: float = 10.0
    verify_ms_each: float = 0.0
    draft_ms_per_call: float = 0.0
    step_ms_each: float = 0.0  # D0's bookkeeping per verification step; 0: not charged
    send_ms_each: float = 0.0
    latency_ms_each: float = 2.0

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return self.stage_ms_each

    def verify_ms(self, n_rows: int, device: int = 0) -> float:
        return self.verify_ms_each

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return self.draft_ms_per_call * n_calls

    def step_ms(self, tree_size: int) -> float:
        return self.step_ms_each

    def send_ms(self, src: int, nbytes: int) -> float:
        return self.send_ms_each

    def latency_ms(self, src: int, dst: int) -> float:
        return self.latency_ms_each


def resolve_profile(name: str, profiles_dir: Path = PROFILES_DIR) -> Path:
    """A profile named in a scenario: a path as given if it exists, else under profiles/."""
    path = Path(name)
    return path if path.exists() else profiles_dir / name


def _device(name: str, key: str, profiles_dir: Path) -> DeviceProfile:
    """The device profile a scenario key names; a profile that cannot be read names the key too."""
    try:
        return DeviceProfile.load(resolve_profile(name, profiles_dir))
    except ProfileError as e:
        raise ProfileError(f"{key} = {name!r}: {e}") from None


class ProfiledPlatform:
    """Costs from measured (or estimated) profiles, for the stages and layer split of a scenario."""

    def __init__(self, scenario: Scenario, profiles_dir: Path = PROFILES_DIR) -> None:
        slowdown = scenario.devices.slowdown
        per_stage = bool(scenario.devices.per_stage)
        self._stages = [
            StageCostModel(
                _device(name, f"devices.per_stage.{i}" if per_stage else "devices.stage", profiles_dir),
                n_layers=n_layers,
                first=i == 0,
                last=i == scenario.pipeline.n_stages - 1,
                slowdown=slowdown,
            )
            for i, (name, n_layers) in enumerate(zip(scenario.stage_profiles, scenario.stage_layers))
        ]
        self._d0 = DraftNodeCostModel(_device(scenario.devices.draft, "devices.draft", profiles_dir), slowdown=slowdown)
        ranks = range(scenario.pipeline.n_stages + 1)  # D0, then V1..VN: one egress link each
        self._links = [link_model(scenario.network.link(rank), profiles_dir) for rank in ranks]

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return self._stages[stage - 1].forward_ms(n_tokens, kv_len)

    def verify_ms(self, n_rows: int, device: int = 0) -> float:
        return self._stages[device - 1].head_ms(n_rows) if device else self._d0.verify_ms(n_rows)

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return self._d0.draft_ms(n_calls, n_rows, kv_len) if n_calls else 0.0

    def step_ms(self, tree_size: int) -> float:
        return self._d0.step_ms(tree_size)

    def send_ms(self, src: int, nbytes: int) -> float:
        return self._links[src].send_ms(nbytes)

    def latency_ms(self, src: int, dst: int) -> float:
        return self._links[src].latency_ms


def link_model(link: LinkConfig, profiles_dir: Path = PROFILES_DIR) -> Link:
    """The cost model of one resolved `network` link: from its profile, or from its numbers."""
    if link.profile:
        return ProfiledLink(LinkProfile.load(resolve_profile(link.profile, profiles_dir)))
    assert link.bandwidth_mbps is not None and link.latency_ms is not None and link.overhead_ms is not None, link
    return RatedLink(LinkCostModel(link.bandwidth_mbps, link.latency_ms, link.overhead_ms))


class Colocated:
    """A platform whose draft node shares its device with the only stage: messages cost nothing."""

    def __init__(self, inner: Platform) -> None:
        self.inner = inner

    def stage_ms(self, stage: int, n_tokens: int, kv_len: int) -> float:
        return self.inner.stage_ms(stage, n_tokens, kv_len)

    def verify_ms(self, n_rows: int, device: int = 0) -> float:
        return self.inner.verify_ms(n_rows, device)

    def draft_ms(self, n_calls: int, n_rows: int, kv_len: int) -> float:
        return self.inner.draft_ms(n_calls, n_rows, kv_len)

    def step_ms(self, tree_size: int) -> float:
        return self.inner.step_ms(tree_size)

    def send_ms(self, src: int, nbytes: int) -> float:
        return 0.0

    def latency_ms(self, src: int, dst: int) -> float:
        return 0.0


def build_platform(scenario: Scenario, profiles_dir: Path = PROFILES_DIR) -> Platform:
    """The profiled platform of `scenario` as its policy runs it (`device_scenario`): what the
    simulator charges and what an emulated runtime pads its compute and paces its links to."""
    scenario = device_scenario(scenario)
    platform: Platform = ProfiledPlatform(scenario, profiles_dir)
    if spec(scenario.policy).one_device:  # D0 shares the stage's device: messages cost nothing
        platform = Colocated(platform)
    return platform


def in_pieces(cost_ms: Callable[[int], float], n_rows: int) -> float:
    """What `n_rows` rows of a batch cost in one forward, or — where that is beyond the profile's
    grid, which is never extrapolated — in the fewest equal forwards the grid covers."""
    for pieces in range(1, n_rows + 1):
        try:
            return pieces * cost_ms(-(-n_rows // pieces))
        except OutOfGridError:
            continue
    return cost_ms(1)  # raises: not even one row is on the grid


def batch_stage_ms(platform: Platform, stage: int, n_rows: int, kv_len: int) -> float:
    """A stage forwarding a batch (one segment of each of several requests, `flowspec.batch`) as
    one: all their rows, attention over the longest KV (shorter ones padded to it). Both backends
    charge exactly this."""
    return in_pieces(lambda rows: platform.stage_ms(stage, rows, kv_len), n_rows)


def batch_verify_ms(platform: Platform, n_rows: int, device: int = 0) -> float:
    """The target's LM head over a batch's decided rows on `device`, as one."""
    return in_pieces(lambda rows: platform.verify_ms(rows, device), n_rows)


def joint_draft(drafts: list[Draft]) -> Draft:
    """Several lanes' drafts as D0 runs them together: as many calls as the deepest needs, every
    lane's rows, every lane's nodes."""
    return Draft(-1, -1, max(d.n_calls for d in drafts), sum(d.n_rows for d in drafts), sum(d.n_nodes for d in drafts))


def batch_draft_ms(platform: Platform, draft: Draft, kv_len: int) -> float:
    """A (joint) draft's forwards, in pieces where its rows per call are past the profile's grid."""
    if draft.n_calls <= 0:
        return 0.0
    return in_pieces(lambda rows: platform.draft_ms(draft.n_calls, rows, kv_len), draft.n_rows)


def d0_step_cost_ms(platform: Platform, event: Event, cmds: list[Command], tree_size: int) -> float:
    """D0's bookkeeping for handling `event`: charged only for a returned segment that led to
    commands (a verification, or the last prompt chunk starting a round) — one that changed nothing
    (emptied by pruning, a chunk of a tree verified whole) costs microseconds. `tree_size` is the
    larger of the tree before and after. The profile's `d0_step` includes the DraftDone that
    follows, so DraftDone is never charged. Both backends charge exactly this."""
    if not (isinstance(event, SegmentReturned) and cmds):
        return 0.0
    return platform.step_ms(max(1, tree_size))


def d0_draft_cost_ms(platform: Platform, draft: Draft, kv_len: int) -> float:
    """The drafter's forwards a `Draft` command asks for, over a context of `kv_len` tokens (the
    request's prompt and outputs so far)."""
    return platform.draft_ms(draft.n_calls, draft.n_rows, kv_len)


def wire_sizes(scenario: Scenario) -> WireSizes:
    """What `scenario`'s messages weigh (its model, where its LM head runs, its temperature)."""
    model = scenario.model
    return WireSizes(model.hidden_size, model.dtype_bytes, model.vocab_size,
                     head_last=scenario.pipeline.head is HeadPlacement.LAST, sampled=scenario.decoding.temperature > 0,
                     features=scenario.features_on_the_wire)  # fmt: skip
