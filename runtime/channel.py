"""One process's ZeroMQ endpoint: a PULL inbox it binds, PUSH sockets to the peers it sends to.

Theory of operation
-------------------
Every process (D0 and each stage) binds one PULL socket and connects one PUSH socket per peer it
talks to. ZeroMQ keeps each (sender, receiver) pair in order and fair-queues between senders, so a
prune from D0 may overtake a segment coming from the previous stage — the versioned ledger
(`flowspec.kv`) makes that harmless. Every receive goes through a poller with a timeout: no call
here blocks without bound. Received frames are not copied; `wire.decode` validates them and wraps
the array frames as numpy views.
"""

from __future__ import annotations

import zmq

from runtime import wire

LINGER_MS = 500  # a stop or error message still gets out when the process closes its sockets


class StageTimeout(RuntimeError):
    """A peer was silent for longer than the scenario's runtime.timeout_s."""


class RemoteError(RuntimeError):
    """A peer reported a failure (its traceback is in the message)."""


class Endpoint:
    def __init__(self, rank: int, host: str = "127.0.0.1", port: int = 0, bind_host: str | None = None) -> None:
        """Bind the inbox on `bind_host` (default: `host`) at `port` (0: a free port)."""
        self.rank = rank
        self.context = zmq.Context()
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        where = f"tcp://{bind_host or host}"
        try:
            if port:
                self.inbox.bind(f"{where}:{port}")
            else:
                port = self.inbox.bind_to_random_port(where)
        except zmq.ZMQError as e:
            self.context.destroy(linger=0)
            raise OSError(f"rank {rank}: cannot listen on {where}:{port or '*'}: {e}") from None
        self.address = f"tcp://{host}:{port}"
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.peers: dict[int, zmq.Socket] = {}

    def connect(self, rank: int, address: str) -> None:
        if rank in self.peers:
            return
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.connect(address)
        self.peers[rank] = sock

    def send(self, rank: int, frames: list[bytes | memoryview]) -> None:
        self.peers[rank].send_multipart(frames, copy=False)

    def send_all(self, frames: list[bytes | memoryview]) -> None:
        for sock in self.peers.values():
            sock.send_multipart(frames, copy=False)

    def recv(self, timeout_s: float) -> wire.Message | None:
        """The next message, or None if none arrived within `timeout_s` (0: do not wait)."""
        if not self.poller.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self.inbox.recv_multipart(copy=False)
        return wire.decode(frames, sender_hint=f"a peer of rank {self.rank}")

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close(linger=LINGER_MS)
        self.inbox.close(linger=0)
        self.context.term()
