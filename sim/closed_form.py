"""What the simulator charges a chain policy (ar-pp, dsd) per token, in closed form.

Theory of operation
-------------------
ar-pp and dsd send one segment per round — the root alone, or the root and a greedy chain of
k = `dsd.length` drafts — and verify it whole when it comes back, so a round is one traversal of
the ring D0 → V1 → … → VN → D0 with nothing else in flight. Its time is then a sum, not a
schedule. With m rows in the segment (1 for ar-pp, k + 1 for dsd) and kv_r slots in every stage's
KV cache at round r, round r costs

    T_r = step(m)                                   D0's bookkeeping after the previous verification
        + draft(k calls, k rows, kv_r + 1)          the chain (ar-pp drafts nothing)
        + [r > 1] · N · send_0(prune_{r-1})         the previous verification's prune to every stage,
                                                    queued on D0's link ahead of the segment
        + Σ_{h=0..N} (send_h(bytes_h(m)) + lat_h)   N + 1 hops: overhead + bytes / bandwidth + latency
        + Σ_{i=1..N} stage_i(m, kv_r)               the forwards
        + verify(m)                                 the target's LM head over the m rows

Round 1 follows the prefill, which broadcasts no prune. A round that emits e_r tokens (accepted
drafts + the bonus) leaves them in every stage's KV and prunes the rejected rows, so
kv_r = prompt + Σ_{j<r} e_j, and its prune carries e_r ids. The time from the first token to the
last is Σ_r T_r (the last step's bookkeeping comes after the last token), so the per-token time
is Σ_r T_r / Σ_r e_r.

The link latency enters once per traversal: per token it is L / e with L = Σ_h lat_h, so with
every draft accepted (e = k + 1 for dsd, 1 for ar-pp) dsd saves L · (1 − 1/(k + 1)) per token in
latency alone — DSD's (N−1)·t1·(k'−1)/k' with k' = k + 1 tokens per traversal and N − 1 hops where
the paper's drafter shares a node with the first and last shards (here D0 is a node of its own,
so the ring has N + 1 hops). The other terms differ too (m rows cost more bytes and compute than
one); `traversal_ms` returns each part so that reports can show which saving is which.

Only the `Platform` protocol and the scenario's wire sizes are read: nothing here runs the engine,
so a test that compares the two checks the engine's event order against this sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flowspec.config import Policy, Scenario
from flowspec.messages import ID_BYTES
from flowspec.platform import Platform, wire_sizes

CHAIN_POLICIES = (Policy.AR_PP, Policy.DSD)


@dataclass(frozen=True, slots=True)
class Traversal:
    """One round's time, in ms, by part (the terms of the module docstring)."""

    d0_ms: float  # step + draft + verify
    prune_ms: float  # the previous prune on D0's link, ahead of the segment
    send_ms: float  # per-message overhead + bytes / bandwidth, over the N + 1 hops
    latency_ms: float  # propagation, over the N + 1 hops
    stages_ms: float  # the N forwards

    @property
    def total_ms(self) -> float:
        return self.d0_ms + self.prune_ms + self.send_ms + self.latency_ms + self.stages_ms


def chain_length(scenario: Scenario) -> int:
    """Drafted tokens per round: `dsd.length` for dsd, 0 for ar-pp."""
    if scenario.policy not in CHAIN_POLICIES:
        raise ValueError(f"closed form covers {', '.join(map(str, CHAIN_POLICIES))}, not {scenario.policy}")
    return scenario.dsd.length if scenario.policy is Policy.DSD else 0


def traversal_ms(scenario: Scenario, platform: Platform, kv_len: int, previous_emitted: int | None) -> Traversal:
    """One round at `kv_len` cached slots; `previous_emitted`: tokens the previous round emitted
    (its prune's size), None for the first round after the prefill."""
    k = chain_length(scenario)
    m, n = k + 1, scenario.pipeline.n_stages
    wire = wire_sizes(scenario)
    verify = platform.verify_ms(m, n if wire.head_last else 0)
    d0 = platform.step_ms(m) + platform.draft_ms(k, k, kv_len + 1) + verify
    prune = 0.0 if previous_emitted is None else n * platform.send_ms(0, ID_BYTES * (previous_emitted + 4))
    sizes = [wire.segment(m, first_hop=True)] + [wire.segment(m, first_hop=False)] * (n - 1) + [wire.returned(m, m)]
    send = sum(platform.send_ms(h, nbytes) for h, nbytes in enumerate(sizes))
    latency = sum(platform.latency_ms(h, (h + 1) % (n + 1)) for h in range(n + 1))
    stages = sum(platform.stage_ms(i, m, kv_len) for i in range(1, n + 1))
    return Traversal(d0, prune, send, latency, stages)


def rounds_all_accepted(scenario: Scenario, max_new_tokens: int) -> list[int]:
    """Tokens each round emits when every draft is accepted: k + 1 a round after the first token
    (which the prefill gives), the last round cut to what is left."""
    m = chain_length(scenario) + 1
    left = max_new_tokens - 1
    return [m] * (left // m) + ([left % m] if left % m else [])


def decode_s(scenario: Scenario, platform: Platform, prompt_tokens: int, emitted: Sequence[int]) -> float:
    """Seconds from a request's first token to its last, its rounds having emitted `emitted`."""
    total_ms, kv_len, previous = 0.0, prompt_tokens, None
    for e in emitted:
        total_ms += traversal_ms(scenario, platform, kv_len, previous).total_ms
        kv_len, previous = kv_len + e, e
    return total_ms / 1000.0


def per_token_s(scenario: Scenario, platform: Platform, prompt_tokens: int, emitted: Sequence[int]) -> float:
    """Decode seconds per token after the first (what `1 / decode_tokens_per_s` measures)."""
    return decode_s(scenario, platform, prompt_tokens, emitted) / sum(emitted)
