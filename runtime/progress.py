"""D0's progress watchdog: is the pipeline still moving, and if not, where is the work stuck?

Theory of operation
-------------------
Silence is not the only way to stop. A stage can heartbeat and never pass its segment on (a
segment it cannot run, a bug, a test's deliberate wedge), and a link can hold a segment far longer
than its budget while both its ends heartbeat. Every stage's heartbeat is a `status`: the last
segment it passed on and when. While a segment is in flight, the pipeline *moves* when D0 sends
into an empty pipeline, a segment comes back, any stage passes one on, or an emulated link still
carries one. If it has not moved for `runtime.timeout_s` plus one heartbeat interval
(timeout_s / 4), the run ends with `StageTimeout` naming the oldest segment in flight, its
request, how long ago it was sent, and the stage that holds it: the one after the last stage that
reports passing it on.

Why that deadline: one hop (a stage's forward, padded on an emulated board, plus its link) already
has to fit in `runtime.timeout_s`, or the stage's silence ends the run; the pipeline moves at least
once per hop, so a long prefill on a slow board moves as often as it is allowed to be silent, and
the watchdog trips only where silence would, had the stage stopped heartbeating. The extra
heartbeat interval covers a status that is one heartbeat old, and lets a stage that knows why it is
stuck (a segment waiting for a prune: `runtime.stage`) say so first, on the same timeout_s. D0
checks only with its inbox drained, so statuses waiting behind a busy D0 are never mistaken for
silence.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from runtime.channel import StageTimeout


@dataclass(frozen=True, slots=True)
class StageStatus:
    """A stage's last `status` heartbeat: how far it got in this run."""

    forwarded: int  # the last segment it passed on (-1: none yet)
    t_forwarded: float  # when, on D0's monotonic clock (0.0: never)
    queued: int  # segments waiting in its queue
    t_seen: float  # when D0 received the status (monotonic)


class ProgressWatch:
    """One run's segments in flight and the stages' statuses; `check` raises when nothing moves."""

    def __init__(self, n_stages: int, addresses: dict[int, str], timeout_s: float) -> None:
        self.n_stages = n_stages
        self.addresses = addresses  # rank -> inbox address, to name a stage (D0's, shared)
        self.timeout_s = timeout_s
        self.statuses: dict[int, StageStatus] = {}
        self.in_flight: OrderedDict[int, tuple[int, float]] = OrderedDict()  # segment id -> (request id, t_sent)
        self.t_returned = 0.0  # when the last segment came back (monotonic)

    def status(self, rank: int, fields: dict, t_seen: float) -> None:
        """A `status` heartbeat from stage `rank`, received at `t_seen`."""
        t_forwarded = min(float(fields["t_forwarded_s"]), t_seen)  # clock offsets are estimates
        self.statuses[rank] = StageStatus(int(fields["forwarded"]), t_forwarded, int(fields["queued"]), t_seen)

    def sent(self, segment_id: int, request_id: int, t: float) -> None:
        self.in_flight[segment_id] = (request_id, t)

    def returned(self, segment_id: int, t: float) -> None:
        self.in_flight.pop(segment_id, None)  # one out of order is the core's to reject
        self.t_returned = t

    def check(self, now: float, link_busy: bool) -> None:
        """Raise `StageTimeout` if work is in flight and the pipeline has not moved for
        `runtime.timeout_s` and a heartbeat (see the module docstring), naming the stage that holds
        the oldest segment. `link_busy`: D0's emulated link still carries a message."""
        if not self.in_flight or link_busy:
            return
        segment_id, (request_id, t_sent) = next(iter(self.in_flight.items()))
        t_moved = max([t_sent, self.t_returned, *(s.t_forwarded for s in self.statuses.values())])
        if now - t_moved <= self.timeout_s * 1.25:
            return
        raise StageTimeout(f"no progress for {now - t_moved:.1f} s while the stages heartbeat (runtime.timeout_s = "
                           f"{self.timeout_s:g}): segment {segment_id} of request {request_id}, sent {now - t_sent:.1f} s "
                           f"ago, {self.whereabouts(segment_id, now)}")  # fmt: skip

    def whereabouts(self, segment_id: int, now: float) -> str:
        """Where segment `segment_id` is stuck, by the stages' statuses: after the last stage that
        passed it on (statuses are up to a heartbeat old, so a later stage's word beats an earlier's)."""
        passed = [rank for rank, s in self.statuses.items() if s.forwarded >= segment_id]
        rank = max(passed, default=0) + 1
        if rank > self.n_stages:
            return "which every stage passed on and D0 never received"
        where = f"stage {rank} ({self.addresses.get(rank, '?')})"
        status = self.statuses.get(rank)
        if status is None:
            return f"is held by {where}, which has sent no status this run"
        said = (f"its status {now - status.t_seen:.1f} s ago: {status.queued} segment(s) queued, last passed on "
                f"{'none' if status.forwarded < 0 else f'segment {status.forwarded}'}")  # fmt: skip
        if status.queued == 0:  # passed on, never received: a link far slower than its budget, or a lost message
            sender = "D0" if rank == 1 else f"stage {rank - 1}"
            return f"has not reached {where} ({said}): late or lost on the link from {sender}"
        return f"is held by {where} ({said})"
