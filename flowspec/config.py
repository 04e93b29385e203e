"""The scenario schema: what a FlowSpec run is configured by, with defaults and checks.

Theory of operation
-------------------
`Scenario` is the root of a tree of frozen `Section` dataclasses (see `flowspec.schema` for how a
section normalizes and validates itself, and how errors get their dotted keys). This module holds
the sections and the scenario-level entry points: `load_scenario` (YAML file plus overrides),
`scenario_from_dict`, `scenario_to_dict` and `dump_scenario` (the resolved YAML a run records).

Rule: defaults live in the dataclass fields and nowhere else. The CLI never restates them; a YAML
preset may spell them out, but no code reads a default from a file.
"""

from __future__ import annotations

import re

import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from flowspec import schema
from flowspec.draft_config import DsdConfig, ExpansionConfig, PipeDecConfig, SpecPipeConfig, TreeConfig
from flowspec.messages import DTYPE_BYTES
from flowspec.runtime_config import DrafterKind, EmulateConfig, RuntimeConfig, Security
from flowspec.schema import ScenarioError, Section, at_least, at_most, from_dict, to_dict

__all__ = [
    "DTYPE_BYTES",
    "LOSSLESS_POLICIES",
    "DecodingConfig",
    "DrafterKind",
    "DsdConfig",
    "EmulateConfig",
    "ExpansionConfig",
    "LinkConfig",
    "ModelConfig",
    "NetworkConfig",
    "PipeDecConfig",
    "PipelineConfig",
    "Policy",
    "RuntimeConfig",
    "Scenario",
    "ScenarioError",
    "Section",
    "Security",
    "SpecPipeConfig",
    "TreeConfig",
    "apply_overrides",
    "dump_scenario",
    "from_dict",
    "load_scenario",
    "scenario_from_dict",
    "scenario_to_dict",
    "to_dict",
]


class Policy(StrEnum):
    """Scheduling policies (DESIGN.md §3); all are lossless except dsd with dsd.tau > 0."""

    FLOWSPEC = "flowspec"  # score-ordered segments + step-wise verification + pruning + expansion
    FLOWSPEC_NOEXPAND = "flowspec-noexpand"  # the same without dynamic expansion (ablation)
    CHUNK_PP = "chunk-pp"  # tree cut into n_stages chunks, verified once the last chunk returns
    PIPEDEC = "pipedec"  # one tree layer per pipeline step, pruned as results return
    AR_PP = "ar-pp"  # plain autoregressive pipeline, one token in flight
    SERIAL = "serial"  # the whole tree as one batch through the pipeline per round
    SINGLE_SD = "single-sd"  # single-device EAGLE-style tree SD, no pipeline
    DSD = "dsd"  # decentralized SD: a drafted chain verified in one traversal, relaxed where unimportant
    SPECPIPE = "specpipe"  # PipeDec's successor: the best new nodes anywhere in the tree each pipeline step
    SPECPIPE_DB = "specpipe-db"  # SpecPipe's multi-request mode: up to pipeline.max_batch requests batched per step
    AR_PP_DB = "ar-pp-db"  # ar-pp with the same dynamic batching (vLLM-style continuous batching): its baseline


# Sizes a run holds in memory, bounded so that a typo (1e9 requests) is an error, not an exhausted machine.
MAX_REQUESTS = 100_000
MAX_NEW_TOKENS = 100_000
MAX_PROMPT_TOKENS = 1_000_000
MAX_OUTPUT_TOKENS = 2_000_000
MAX_BATCH = 256
NOT_IN_NAME = re.compile(r"[/\\\x00]")  # a scenario's name is a folder under runs/, never a path

LOSSLESS_POLICIES = frozenset(Policy)  # at their defaults (dsd: tau = 0); Scenario.lossless says per scenario



@dataclass(frozen=True, slots=True, kw_only=True)
class DecodingConfig(Section):
    temperature: float = 0.0
    """Sampling temperature; 0 means greedy (argmax) verification."""
    max_new_tokens: int = 128
    """Tokens to generate per request, EOS permitting."""
    eos_token_id: int | None = None
    """Token that ends a request early; None disables early stopping."""

    def _check(self) -> None:
        at_least(self, "temperature", 0.0)
        at_least(self, "max_new_tokens", 1)
        at_most(self, "max_new_tokens", MAX_NEW_TOKENS, "every step's records are kept in memory")
        if self.eos_token_id is not None:
            at_least(self, "eos_token_id", 0)


class HeadPlacement(StrEnum):
    D0 = "d0"  # the draft node computes the target's decisions from returned hidden states
    LAST = "last"  # the last stage does, and returns them instead


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig(Section):
    n_stages: int = 4
    """Verification stages V1..VN holding target layers; the draft node D0 is extra."""
    layers: tuple[int, ...] = ()
    """Target layers per stage, V1 first; empty means an equal split of model.n_layers."""
    head: HeadPlacement = HeadPlacement.D0
    """Where the target's LM head runs: d0 (as the FlowSpec reference: the last stage returns hidden
    states) or last (the last stage returns the target's decisions: argmax ids at temperature 0,
    logits above it; hidden states too when D0's drafter reads them, as EAGLE does)."""
    max_batch: int = 4
    """Requests a batching policy (specpipe-db, ar-pp-db) serves at once, each with its own tree and
    KV; a device forwards every segment waiting for it as one batch. The other policies serve one
    request at a time and ignore it."""

    def _check(self) -> None:
        at_least(self, "n_stages", 1)
        at_least(self, "max_batch", 1)
        at_most(self, "max_batch", MAX_BATCH, "each request in a batch holds its own KV on every stage")
        if self.layers and len(self.layers) != self.n_stages:
            raise ScenarioError(f"layers must list {self.n_stages} stages (n_stages), got {len(self.layers)}")
        if any(n < 1 for n in self.layers):
            raise ScenarioError(f"layers must all be >= 1, got {list(self.layers)}")


class Arrivals(StrEnum):
    SINGLE = "single"  # requests back to back, each arriving when the previous one finished
    POISSON = "poisson"  # exponential inter-arrival times at rate_per_s
    TRACE = "trace"  # arrival times (and lengths) from a CSV file


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadConfig(Section):
    arrivals: Arrivals = Arrivals.SINGLE
    """How requests arrive: single, poisson or trace."""
    n_requests: int = 1
    """Requests to serve (single, poisson)."""
    rate_per_s: float = 0.05
    """Mean arrivals per second (poisson): sparse requests are the regime FlowSpec targets."""
    prompt_tokens: int = 128
    """Prompt length of every request (single, poisson)."""
    trace: str | None = None
    """CSV with columns t_arrival_s, prompt_tokens, max_new_tokens (trace), relative to the scenario."""

    def _check(self) -> None:
        at_least(self, "n_requests", 1)
        at_most(self, "n_requests", MAX_REQUESTS, "every request's records are kept in memory")
        at_least(self, "prompt_tokens", 1)
        at_most(self, "prompt_tokens", MAX_PROMPT_TOKENS, "a prompt is held whole")
        if not self.rate_per_s > 0:
            raise ScenarioError(f"rate_per_s must be > 0, got {self.rate_per_s!r}")
        if self.arrivals is Arrivals.TRACE and not self.trace:
            raise ScenarioError("trace must name a CSV file when arrivals is trace")


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicesConfig(Section):
    draft: str = "cpu-epyc-2c/smollm2-135m"
    """Profile of the draft node D0 (drafter + target LM head): a folder under profiles/ or a path."""
    stage: str = "cpu-epyc-2c/smollm2-135m"
    """Profile of every verification stage, unless per_stage lists them one by one."""
    per_stage: tuple[str, ...] = ()
    """One profile per verification stage (V1 first), for heterogeneous pipelines."""
    slowdown: float = 1.0
    """Multiplies every compute time: a board this much slower than its profile."""
    host_cores: int = 0
    """Every device runs on one host with this many cores (a loopback run: one process per device);
    at most this many compute at once and the others wait. 0: each device is its own board."""

    def _check(self) -> None:
        if not self.slowdown > 0:
            raise ScenarioError(f"slowdown must be > 0, got {self.slowdown!r}")
        at_least(self, "host_cores", 0)
        for key, name in (("draft", self.draft), ("stage", self.stage), *((f"per_stage.{i}", n) for i, n in enumerate(self.per_stage))):
            if not name.strip():
                raise ScenarioError(f"{key} must name a device profile (a folder under profiles/ or a path), got {name!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkConfig(Section):
    """One device's egress link: given by numbers, or priced from a measured link profile."""

    bandwidth_mbps: float | None = None
    """Egress bandwidth in megabits per second; left out: network.bandwidth_mbps."""
    latency_ms: float | None = None
    """One-way propagation latency; left out: network.latency_ms."""
    overhead_ms: float | None = None
    """Per-message cost on the sender's link; left out: network.overhead_ms."""
    profile: str | None = None
    """Link profile (a folder under profiles/, e.g. links/loopback-tcp, or a path) that prices every
    message by its size, instead of the three numbers above (profiles/README.md, "Link profile")."""

    def _check(self) -> None:
        numbers = [n for n in ("bandwidth_mbps", "latency_ms", "overhead_ms") if getattr(self, n) is not None]
        if self.profile is not None:
            if not self.profile:
                raise ScenarioError("profile must not be empty")
            if numbers:
                # A profile's measured times already hold the overhead and the latency: adding
                # either on top would count it twice, so the two forms do not mix.
                raise ScenarioError(f"{numbers[0]} cannot be set with profile (a link is either numbers or a profile)")
        if self.bandwidth_mbps is not None and not self.bandwidth_mbps > 0:
            raise ScenarioError(f"bandwidth_mbps must be > 0, got {self.bandwidth_mbps!r}")
        for name in ("latency_ms", "overhead_ms"):
            if getattr(self, name) is not None:
                at_least(self, name, 0.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConfig(Section):
    bandwidth_mbps: float = 1000.0
    """Egress bandwidth of every device's link, in megabits per second."""
    latency_ms: float = 0.1
    """One-way propagation latency of every hop."""
    overhead_ms: float = 0.05
    """Per-message cost on the sender's link (framing, syscalls)."""
    links: tuple[LinkConfig, ...] = ()
    """Per-device egress links, D0 first, then V1..VN (pipeline.n_stages + 1 entries); empty: every
    device has the link above. An entry's left-out numbers are the ones above (`{}` is that link)."""

    def _check(self) -> None:
        if not self.bandwidth_mbps > 0:
            raise ScenarioError(f"bandwidth_mbps must be > 0, got {self.bandwidth_mbps!r}")
        at_least(self, "latency_ms", 0.0)
        at_least(self, "overhead_ms", 0.0)
        # Fill each entry's left-out numbers now, so that `flowspec check` and resolved.yaml show
        # every hop's actual link. Idempotent: a resolved entry resolves to itself.
        resolved = tuple(link if link.profile else self._filled(link) for link in self.links)
        if resolved != self.links:
            object.__setattr__(self, "links", resolved)  # frozen: as Section normalizes fields

    def _filled(self, link: LinkConfig) -> LinkConfig:
        return LinkConfig(
            bandwidth_mbps=self.bandwidth_mbps if link.bandwidth_mbps is None else link.bandwidth_mbps,
            latency_ms=self.latency_ms if link.latency_ms is None else link.latency_ms,
            overhead_ms=self.overhead_ms if link.overhead_ms is None else link.overhead_ms,
        )

    def link(self, rank: int) -> LinkConfig:
        """Device `rank`'s egress link (0: D0, i: Vi), resolved: a profile, or all three numbers."""
        return self.links[rank] if self.links else self._filled(LinkConfig())


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptanceConfig(Section):
    profile: str = "acceptance/eagle2-7b-chat-estimate.csv"
    """Acceptance profile (P[target token is the child of rank r at depth d]) for the synthetic
    drafter/target pair of the simulator: a file under profiles/ or a path."""

    def _check(self) -> None:
        if not self.profile.strip():
            raise ScenarioError(f"profile must name an acceptance profile (a CSV under profiles/ or a path), got {self.profile!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig(Section):
    n_layers: int = 30
    """Target decoder layers (SmolLM2-135M: 30)."""
    hidden_size: int = 576
    """Width of the hidden states passed between stages (SmolLM2-135M: 576)."""
    vocab_size: int = 49152
    """Rows of the LM head (SmolLM2-135M: 49152)."""
    dtype: str = "float32"
    """Dtype of hidden states on the wire: float32, float16 or bfloat16."""
    context_tokens: int = 0
    """Positions the model attends to (prompt + output of one request); 0: not bounded. The runtime
    fills it from the model (SmolLM2-135M: 8192) and refuses longer requests."""

    def _check(self) -> None:
        at_least(self, "n_layers", 1)
        at_least(self, "hidden_size", 1)
        at_least(self, "vocab_size", 2)  # one token leaves nothing to draft or decide
        at_most(self, "vocab_size", 2**31 - 1, "token ids are 32-bit integers")
        at_most(self, "hidden_size", 2**20, "the widest hidden state a frame may carry")
        at_most(self, "n_layers", 10_000, "one cost row per layer is kept")
        at_least(self, "context_tokens", 0)
        if self.dtype not in DTYPE_BYTES:
            raise ScenarioError(f"dtype must be one of {', '.join(sorted(DTYPE_BYTES))}, got {self.dtype!r}")

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of `dtype`."""
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario(Section):
    name: str = "scenario"
    """Label for outputs; the loader uses the file stem when the YAML omits it."""
    policy: Policy = Policy.FLOWSPEC
    """Which scheduling policy drives the pipeline."""
    seed: int = 0
    """Seed of the run's numpy Generator: every stochastic choice draws from it."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    expansion: ExpansionConfig = field(default_factory=ExpansionConfig)
    pipedec: PipeDecConfig = field(default_factory=PipeDecConfig)
    specpipe: SpecPipeConfig = field(default_factory=SpecPipeConfig)
    dsd: DsdConfig = field(default_factory=DsdConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)

    def _check(self) -> None:
        if not self.name:
            raise ScenarioError("name must not be empty")
        if NOT_IN_NAME.search(self.name) or self.name in (".", ".."):  # it names the output folder under runs/
            raise ScenarioError(f"name must be a plain folder name (no '/', '\\', '..' alone), got {self.name!r}")
        at_least(self, "seed", 0)  # numpy's SeedSequence rejects negative seeds
        at_most(self, "seed", 2**63 - 1, "torch seeds are signed 64-bit")
        n_tokens = self.workload.n_requests * self.decoding.max_new_tokens
        if self.workload.arrivals is not Arrivals.TRACE and n_tokens > MAX_OUTPUT_TOKENS:
            raise ScenarioError(f"workload.n_requests x decoding.max_new_tokens must be <= {MAX_OUTPUT_TOKENS} "
                                f"(every step's records are kept in memory), got {n_tokens}")  # fmt: skip
        context = self.model.context_tokens
        if context and self.workload.arrivals is not Arrivals.TRACE and \
                self.workload.prompt_tokens + self.decoding.max_new_tokens > context:  # fmt: skip
            raise ScenarioError(f"workload.prompt_tokens + decoding.max_new_tokens must be <= model.context_tokens = "
                                f"{context}, got {self.workload.prompt_tokens + self.decoding.max_new_tokens}")  # fmt: skip
        vocab = self.model.vocab_size
        for key, value in (("tree.topk", self.tree.topk), ("expansion.topk", self.expansion.topk),
                           ("pipedec.width", self.pipedec.width), ("specpipe.width", self.specpipe.width)):  # fmt: skip
            if value > vocab:
                raise ScenarioError(f"{key} must be <= model.vocab_size = {vocab} (children of one node), got {value}")
        n_stages, n_layers = self.pipeline.n_stages, self.model.n_layers
        if n_stages > n_layers:
            raise ScenarioError(f"pipeline.n_stages must be <= model.n_layers = {n_layers}, got {n_stages}")
        if self.pipeline.layers and sum(self.pipeline.layers) != n_layers:
            raise ScenarioError(
                f"pipeline.layers must sum to model.n_layers = {n_layers}, got {sum(self.pipeline.layers)}"
            )
        per_stage = self.devices.per_stage
        if per_stage and len(per_stage) != n_stages:
            raise ScenarioError(f"devices.per_stage must list {n_stages} profiles (pipeline.n_stages), got {len(per_stage)}")
        links = self.network.links
        if links and len(links) != n_stages + 1:
            raise ScenarioError(f"network.links must list {n_stages + 1} links (D0, then each stage), got {len(links)}")
        hosts = self.runtime.hosts
        if hosts and len(hosts) != n_stages + 1:
            raise ScenarioError(f"runtime.hosts must list {n_stages + 1} addresses (D0, then each stage), got {len(hosts)}")
        for name in ("stage_devices", "stage_dtypes"):
            given = getattr(self.runtime, name)
            if given and len(given) != n_stages:
                raise ScenarioError(f"runtime.{name} must list {n_stages} entries (pipeline.n_stages), got {len(given)}")
        if hosts and self.emulate.dilation:
            raise ScenarioError("emulate.dilation: an emulated testbed runs on one machine; leave runtime.hosts empty")
        if hosts and not self.runtime.base_port:
            raise ScenarioError("runtime.base_port must be set (> 0) when runtime.hosts lists a testbed")
        if self.dsd.tau > 0 and self.decoding.temperature > 0:
            raise ScenarioError("dsd.tau relaxes greedy verification: it needs decoding.temperature 0")
        if self.dsd.tau > 0 and self.pipeline.head is HeadPlacement.LAST:
            raise ScenarioError("dsd.tau > 0 reads the target's distributions on D0: it needs pipeline.head: d0")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        """Layers held by V1..VN: pipeline.layers, or an equal split (larger stages last)."""
        if self.pipeline.layers:
            return self.pipeline.layers
        base, extra = divmod(self.model.n_layers, self.pipeline.n_stages)
        return (base,) * (self.pipeline.n_stages - extra) + (base + 1,) * extra

    @property
    def stage_profiles(self) -> tuple[str, ...]:
        return self.devices.per_stage or (self.devices.stage,) * self.pipeline.n_stages

    @property
    def relaxed(self) -> bool:
        """Whether verification accepts tokens the target did not choose (dsd with tau > 0)."""
        return self.policy is Policy.DSD and self.dsd.tau > 0

    @property
    def lossless(self) -> bool:
        """Whether the output is the target's own (greedy: token for token)."""
        return not self.relaxed

    @property
    def target_distributions(self) -> bool:
        """Whether verification reads the target's distributions, not only its argmax: sampling
        (T > 0) and relaxed acceptance."""
        return self.decoding.temperature > 0 or self.relaxed

    @property
    def features_on_the_wire(self) -> bool:
        """Whether the last stage's hidden states travel back to D0: always with the head on D0,
        and with it on the last stage when D0's drafter reads the target's features (EAGLE)."""
        return self.pipeline.head is HeadPlacement.D0 or self.runtime.drafter_kind is DrafterKind.EAGLE

    def stage_compute(self, rank: int) -> tuple[str, str]:
        """(device, dtype) the runtime computes stage `rank` (1..N) on; rank 0 is D0."""
        rt = self.runtime
        if rank == 0:
            return rt.device, rt.dtype
        return (rt.stage_devices[rank - 1] if rt.stage_devices else rt.device,
                rt.stage_dtypes[rank - 1] if rt.stage_dtypes else rt.dtype)  # fmt: skip


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str], source: str = "<overrides>"
) -> dict[str, Any]:
    """A copy of `data` with `dotted.key=value` overrides applied (keys checked against Scenario).

    >>> apply_overrides({"tree": {"topk": 4}}, ["tree.topk=8", "policy=chunk-pp"])
    {'tree': {'topk': 8}, 'policy': 'chunk-pp'}
    """
    return schema.apply_overrides(data, overrides, source, Scenario)


def scenario_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Scenario:
    """Build and validate a Scenario from a plain mapping (parsed YAML)."""
    return from_dict(Scenario, data, source)


def scenario_to_dict(scenario: Scenario) -> dict[str, Any]:
    """Plain form of `scenario`; `scenario_from_dict(scenario_to_dict(s)) == s`."""
    return to_dict(scenario)


def dump_scenario(scenario: Scenario) -> str:
    """YAML text of the fully resolved scenario (every default spelled out), in field order."""
    return yaml.safe_dump(scenario_to_dict(scenario), sort_keys=False, allow_unicode=True)


def load_scenario(path: str | PathLike[str], overrides: Sequence[str] = ()) -> Scenario:
    """Read a YAML scenario, apply `overrides`, validate. Errors start with `path` as given."""
    source = str(path)
    data = _read_yaml(Path(path), source)
    data.setdefault("name", Path(path).stem)
    return scenario_from_dict(apply_overrides(data, overrides, source), source)


def _read_yaml(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{source}: no such file") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{source}: not UTF-8 text") from None
    except OSError as e:
        raise ScenarioError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ScenarioError(f"{source}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:  # an empty file (or only comments) means "all defaults"
        return {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: top level must be a mapping, got {reprlib.repr(data)}")
    return data
