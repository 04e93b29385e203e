"""The scenario's drafting sections: the shape of what each policy drafts. `tree` (a round's first
EAGLE-2 tree), `expansion` (FlowSpec's growth after a verification), `pipedec` and `specpipe` (nodes
per pipeline step), `dsd` (the chain and its relaxed acceptance). `flowspec.policy` reads them;
`flowspec.config` assembles them into a `Scenario` with every other section."""

from __future__ import annotations

from dataclasses import dataclass

from flowspec.schema import ScenarioError, Section, at_least

IMPORTANCE_FUNCTIONS = ("entropy", "none")  # flowspec.verify.IMPORTANCE


def _check_beam(total: int, topk: int, depth: int) -> None:
    """Reject a `total` larger than the EAGLE-2 candidate pool.

    The beam scores topk candidates in its first layer and topk**2 in each later iteration, then
    keeps the best `total`: asking for more than it scored cannot be honoured.
    """
    pool = topk + depth * topk * topk
    if total > pool:
        raise ScenarioError(f"total must be <= topk + depth * topk**2 = {pool} (the beam's candidates), got {total}")


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeConfig(Section):
    total: int = 80
    """Drafted nodes in a round's initial tree, the root excluded."""
    topk: int = 10
    """Beam width and children per expanded node."""
    depth: int = 6
    """EAGLE-2 beam iterations after the first layer: paths hold up to depth + 1 draft tokens."""
    segment_size: int = 16
    """Most nodes per segment when the initial tree is cut for the pipeline."""

    def _check(self) -> None:
        at_least(self, "total", 0)
        at_least(self, "topk", 1)
        at_least(self, "depth", 0)
        at_least(self, "segment_size", 1)
        _check_beam(self.total, self.topk, self.depth)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpansionConfig(Section):
    total: int = 64
    """Drafted nodes per expansion tree grown from the new root, the root excluded."""
    topk: int = 10
    """Beam width and children per expanded node."""
    depth: int = 6
    """Beam iterations after the first layer, as in TreeConfig.depth."""

    def _check(self) -> None:
        at_least(self, "total", 0)
        at_least(self, "topk", 1)
        at_least(self, "depth", 0)
        _check_beam(self.total, self.topk, self.depth)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipeDecConfig(Section):
    width: int = 16
    """Nodes per tree layer in the PipeDec baseline."""

    def _check(self) -> None:
        at_least(self, "width", 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecPipeConfig(Section):
    width: int = 16
    """Nodes the specpipe policy sends into the pipeline per step: the best new nodes anywhere in its
    dynamic tree, by cumulative draft probability (PipeDec's width, without its layer-by-layer rule)."""

    def _check(self) -> None:
        at_least(self, "width", 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class DsdConfig(Section):
    length: int = 5
    """Tokens in the chain the dsd policy drafts and verifies in one traversal of the pipeline."""
    tau: float = 0.0
    """Relaxation of acceptance (0..1): 0 is strict verification (lossless); above it a drafted token
    the target did not choose is accepted where the position matters little (flowspec.verify)."""
    importance: str = "entropy"
    """How much a position matters: entropy (exp(-H(p)) of the target's distribution p) or none (0)."""

    def _check(self) -> None:
        at_least(self, "length", 1)
        if not 0.0 <= self.tau <= 1.0:  # also refuses nan
            raise ScenarioError(f"tau must be within [0, 1], got {self.tau}")
        if self.importance not in IMPORTANCE_FUNCTIONS:
            raise ScenarioError(f"importance must be one of {', '.join(IMPORTANCE_FUNCTIONS)}, got {self.importance!r}")
