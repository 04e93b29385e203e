"""The target's decisions at D0: its LM head over returned hidden states, or the last stage's verdicts.

Theory of operation
-------------------
A segment back from VN carries either post-norm hidden states (`pipeline.head: d0`: D0 holds the
LM head and applies it here) or what a last stage holding the head decided (`pipeline.head: last`:
its argmax ids at T = 0, its logits at T > 0). Either way the core gets, per segment row, the
target's argmax (-1 where nothing was decided: a prompt chunk's rows, all but the last) and, at
T > 0 or under relaxed acceptance, the target's distributions. Only *decided* rows cost anything:
a prompt chunk's last row only if it is the prompt's last chunk, since the rest nobody reads and
the head over every prompt row would cost D0 tens of milliseconds per chunk.

Nothing is decided here beyond the target's own verdicts; verification is the core's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowspec.messages import Segment
from flowspec.pipeline import ProtocolError
from runtime import wire

Verdicts = tuple[np.ndarray | None, np.ndarray | None]  # argmax [len(seg)] or None, probs [rows, V] or None


@dataclass(frozen=True, slots=True)
class TargetHead:
    """One run's view of the target's head: its weights on D0's device and how it decides."""

    weight: torch.Tensor  # [V, H] the target's output embedding, in its precision on D0's device
    temperature: float  # decoding.temperature: 0 argmax, > 0 sampled from the softmax
    relaxed: bool  # dsd with tau > 0: verification reads the target's distributions beside the argmax

    def over_hidden(self, seg: Segment, h: torch.Tensor, n_rows: int) -> Verdicts:
        """The head applied here (`pipeline.head: d0`) to the segment's `n_rows` decided rows."""
        with torch.inference_mode():
            logits = h[len(seg) - n_rows :].to(self.weight.device, self.weight.dtype) @ self.weight.T  # [rows, V]
            return self.from_logits(seg, logits, n_rows)

    def returned(self, msg: wire.Message, seg: Segment, n_rows: int) -> Verdicts:
        """The decisions a last stage with the LM head returned (`pipeline.head: last`)."""
        if n_rows == 0:  # nothing decided (a prompt chunk before the last, a segment pruned empty)
            return self.from_logits(seg, torch.zeros((0, self.weight.shape[0])), 0)
        name = "logits" if self.temperature > 0 else "argmax"
        got = msg.arrays.get(name)
        expected = (n_rows, self.weight.shape[0]) if name == "logits" else (len(seg),)
        if got is None or got.shape != expected:
            raise ProtocolError(f"segment message from rank {msg.sender}: field {name}: "
                                f"{'missing' if got is None else f'shape {list(got.shape)}'}, expected {list(expected)}")  # fmt: skip
        if name == "argmax":
            return got.astype(np.int64), None
        return self.from_logits(seg, torch.from_numpy(got.copy()), n_rows)

    def from_logits(self, seg: Segment, logits: torch.Tensor, n_rows: int) -> Verdicts:
        if self.temperature > 0:
            return None, torch.softmax(logits.double() / self.temperature, dim=-1).cpu().numpy()
        argmax = np.full(len(seg), -1, dtype=np.int64)
        argmax[len(seg) - n_rows :] = logits.argmax(dim=-1).cpu().numpy()
        if self.relaxed:  # the decisions stay the argmax; relaxation reads p at T = 1 beside them
            probs = np.zeros((len(seg), logits.shape[-1]))
            probs[len(seg) - n_rows :] = torch.softmax(logits.double(), dim=-1).cpu().numpy()
            return argmax, probs
        return argmax, None
