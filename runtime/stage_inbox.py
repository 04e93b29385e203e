"""What a stage's inbox accepts: who may send which message, and the bounds a segment must fit.

The inbox is reachable by anyone, so every frame that `wire.decode` let through is checked here
against what this stage is — its rank (who its peers are), the model's vocabulary and width (read
from config.json: importing transformers for two numbers would cost a board 80 MB) and its queue's
bounds — before the stage applies anything. A check that fails raises `ProtocolError` naming the
claimed sender and the field, and the stage drops the frame (`runtime.stage`). The ledger's own
checks (`StageLedger.check_prune`, `check_segment`) come after these, on the ledger's state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowspec.messages import ProtocolError, Segment
from runtime import wire
from runtime.llama import LlamaShape, ShapeError
from runtime.models import ModelError

FROM_D0 = frozenset({"prune", "flush", "stop", "heartbeat"})  # what only D0 sends a stage while it serves
MAX_QUEUED = 4096  # segments: a 245k-token prompt's chunks all at once; more is a flood
MAX_QUEUED_NBYTES = 1 << 30  # the frames queued segments hold
_ADDRESS = re.compile(r"tcp://[\w.\-:\[\]]+:\d{1,5}")


@dataclass(frozen=True, slots=True)
class Queued:
    """A segment that passed the arrival checks, waiting for its forward."""

    segment: Segment
    hidden: np.ndarray | None  # [L, H] as received (None on the first hop)
    hidden_dtype: str | None
    nbytes: int  # of its frames
    arrival: list | None  # its row in the endpoint's arrivals, forgotten if it is rejected later


@dataclass(frozen=True, slots=True)
class FrameBounds:
    """The checks of stage `rank` (1..N) of a model with `vocab_size` tokens of width `hidden_size`."""

    rank: int
    vocab_size: int
    hidden_size: int

    @classmethod
    def read(cls, model_dir: Path, rank: int) -> FrameBounds:
        try:
            shape = LlamaShape.read(model_dir)
        except ShapeError as e:
            raise ModelError(f"runtime.model: {e}") from None
        return cls(rank, shape.vocab_size, shape.hidden_size)

    @property
    def max_frame_nbytes(self) -> int:
        """The widest frame a peer may send: MAX_ROWS float32 hidden states, or int64 ids."""
        return wire.MAX_ROWS * max(self.hidden_size * 4, 8)

    def check_sender(self, msg: wire.Message) -> None:
        """Segments come from the previous stage, D0's messages from D0, errors from either."""
        rank = self.rank
        if msg.type == "segment":
            if msg.sender != rank - 1:
                raise ProtocolError(f"segment message from rank {msg.sender}: stage {rank} takes segments from rank {rank - 1}")
        elif msg.type in FROM_D0:
            if msg.sender != 0:
                raise ProtocolError(f"{msg.type} message from rank {msg.sender}: only D0 sends it")
        elif msg.type == "error":
            if msg.sender not in (0, rank - 1):
                raise ProtocolError(f"error message from rank {msg.sender}: not a peer of stage {rank}")
        else:
            raise ProtocolError(f"{msg.type} message from rank {msg.sender}: not expected by stage {rank}")

    def admit(self, msg: wire.Message, arrival: list | None, n_queued: int, queued_nbytes: int) -> Queued:
        """The segment in `msg` as it queues, if it fits this stage and a queue holding `n_queued`
        segments of `queued_nbytes`; its ledger check comes before its forward."""
        seg = wire.to_segment(msg)
        who = f"segment message from rank {msg.sender}"
        hidden = msg.arrays.get("hidden")
        if (hidden is None) != (self.rank == 1):
            raise ProtocolError(f"{who}: field hidden: {'missing after' if hidden is None else 'sent on'} the first hop")
        if hidden is not None and hidden.shape[1] != self.hidden_size:
            raise ProtocolError(f"{who}: field hidden: width {hidden.shape[1]}, the model's is {self.hidden_size}")
        if "argmax" in msg.arrays or "logits" in msg.arrays:
            raise ProtocolError(f"{who}: carries decisions, which only D0 receives")
        if len(seg) and not (0 <= seg.tokens.min() and seg.tokens.max() < self.vocab_size):
            raise ProtocolError(f"{who}: field tokens: ids {int(seg.tokens.min())}..{int(seg.tokens.max())} outside "
                                f"the vocabulary 0..{self.vocab_size - 1}")  # fmt: skip
        if len(seg) and seg.positions.min() < 0:
            raise ProtocolError(f"{who}: field positions: {int(seg.positions.min())} < 0")
        nbytes = sum(a.nbytes for a in msg.arrays.values())
        if n_queued >= MAX_QUEUED or queued_nbytes + nbytes > MAX_QUEUED_NBYTES:
            raise ProtocolError(f"{who}: stage {self.rank}'s queue is full ({n_queued} segments, "
                                f"{queued_nbytes} bytes)")  # fmt: skip
        dtype = None if hidden is None else msg.dtypes["hidden"]
        return Queued(seg, hidden, dtype, nbytes, arrival)

    def peers_refusal(self, msg: wire.Message, has_next: bool) -> str | None:
        """Why `msg` is not D0's peer list (anything else before it is refused), or None if it is;
        `has_next`: this stage sends on to a next stage, whose address the list must give."""
        nxt = str(msg.fields.get("next", ""))
        if msg.type != "peers" or msg.sender != 0:
            return f"{msg.type} message from rank {msg.sender}: not expected before D0's peer list"
        if has_next and not _ADDRESS.fullmatch(nxt):
            return f"peers message from rank 0: field next: {nxt[:80]!r} is not tcp://host:port"
        return None
