"""FlowSpec's shared scheduling core: pure Python + numpy, sans I/O.

Glossary
--------
draft node (D0)
    Device 0: holds the draft model, the target's LM head and the whole draft tree; runs the core.
stage (V1..VN)
    A verification device holding a contiguous slice of the target's layers and a KV cache.
round
    One draft tree's life: drafted from the last sampled token, streamed and verified step by step,
    ended when a sampled token falls outside the tree.
step
    One segment returning to D0: it is verified (or found empty), one prune is broadcast.
draft tree, node, root
    EAGLE-2 token tree in verification order (topological); node 0 is the root, the token sampled
    last, whose KV no stage holds yet. Nodes carry stable ids, absolute positions and cumulative
    draft log-probs (`score`).
segment
    A contiguous slice of the tree order streamed through the stages as one message.
accepted
    Draft tokens the target agreed with. `n_accepted` counts the root too, so it equals the tokens
    committed by a verification ("accepted length, bonus included").
bonus
    The token the target chose after the accepted path; it is always emitted and becomes the next
    root — by re-rooting into the tree when it is an unverified child, else by a new round.
prune
    D0's one message per verification: the accepted path and the surviving node ids. Stages fold the
    accepted path into their committed prefix and drop everything else that was not kept.
expansion
    A fresh tree grown from the new root after a verification, merged into the current tree
    (append-only, deduplicated by token path); its new nodes form the next segment.
τ (tau)
    Mean accepted length per verification, bonus included (= mean `n_accepted`).

Theory of operation
-------------------
Backends feed `PipelineCore.handle(event, now)` with `flowspec.messages` events and execute the
commands it returns; stage workers keep their KV in step with `flowspec.kv.StageLedger`. The
core never reads a clock, sleeps or does I/O; time and randomness are injected. The simulator and
the runtime drive the very same core, so the same acceptance outcomes give the same commands.
"""

import importlib

# Where each public name lives. Imported on first use (PEP 562): a stage process imports a few
# of these modules and must not pay for the rest (the records' pandas, the core's policies).
_EXPORTS = {
    "Policy": "config", "Scenario": "config", "ScenarioError": "config", "load_scenario": "config",
    "StageLedger": "kv", "PipelineCore": "pipeline", "RunRecords": "records", "Drafter": "tree", "DraftTree": "tree",
    **{name: "messages" for name in ("BroadcastPrune", "Draft", "DraftDone", "EmitTokens", "FinishRequest",
                                     "ProtocolError", "Prune", "RequestArrived", "Segment", "SegmentKind",
                                     "SegmentReturned", "SendSegment")},
}  # fmt: skip


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flowspec' has no attribute {name!r}")
    return getattr(importlib.import_module(f"flowspec.{_EXPORTS[name]}"), name)


__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)  # the public names are the lazily imported ones
