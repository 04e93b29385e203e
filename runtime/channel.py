"""One process's ZeroMQ endpoint: a PULL inbox it binds, PUSH sockets to the peers it sends to.

Theory of operation
-------------------
Every process (D0 and each stage) binds one PULL socket and connects one PUSH socket per peer it
talks to. ZeroMQ keeps each (sender, receiver) pair in order and fair-queues between senders, so a
prune from D0 may overtake a segment coming from the previous stage — the versioned ledger
(`flowspec.kv`) makes that harmless. Every receive goes through a poller with a timeout: no call
here blocks without bound. Received frames are not copied; `wire.decode` validates them and wraps
the array frames as numpy views; a frame that fails raises `ProtocolError`, and the caller decides
whether that ends it (a stage drops the frame and keeps serving: `runtime.stage`).

The inbox is open to anyone who can reach its port, so it is bounded at the socket too: a
connection that has not completed the ZeroMQ handshake within `HANDSHAKE_MS` is dropped (a port
scanner, a health check, a stray HTTP client), as is a peer that sends a frame larger than
`max_frame_nbytes`; TCP keepalive drops peers that vanished without closing. `raise_fd_limit`
lifts the soft open-file limit, since every connection costs a descriptor until it is dropped.

Who is heard (`runtime.security`): with a `Keyring` the inbox is a CURVE server and each PUSH
socket a CURVE client holding its own pair and the peer's public key; with `allowed` addresses
the inbox hears no one else. Both are decided by a ZAP handler (`ThreadAuthenticator`) on the
endpoint's context, started before the inbox binds: without a handler libzmq would let any CURVE
client in. A refused peer never completes its handshake, so nothing it sends reaches `recv` (its
PUSH socket keeps the messages and retries, unheard). ZAP sees only connections with a security
mechanism or a ZAP domain, so the inbox sets a domain: plain (NULL) connections are filtered too.
With CURVE the key a message came with names its sender: the handler's user id for a connection
is the client's public key, and a message whose claimed rank is not that key's rank fails like a
malformed one (`ProtocolError`), so one board's key cannot speak for D0 or another stage.
"""

from __future__ import annotations

import errno
import resource
import sys

import zmq
from zmq.auth.thread import ThreadAuthenticator

from flowspec.messages import ProtocolError
from runtime import wire
from runtime.security import Keyring

LINGER_MS = 500  # a stop or error message still gets out when the process closes its sockets
HANDSHAKE_MS = 5000  # ZeroMQ's default is 30 s; a real peer completes it in milliseconds, even on a testbed
KEEPALIVE_IDLE_S = 30  # then probes every 10 s, 3 unanswered: a vanished peer's connection closes in ~1 min
FD_LIMIT = 1 << 16  # raising the soft limit past this buys nothing a stage needs
ZAP_DOMAIN = b"flowspec"  # any non-empty domain makes libzmq ask the handler about NULL connections too
MAX_LOGGED_REFUSALS = 100  # addresses, each logged once: a scan of a whole subnet cannot fill a disk


def raise_fd_limit(limit: int = FD_LIMIT) -> int:
    """Raise this process's soft open-file limit towards its hard limit (at most `limit`); the new
    soft limit. Boards often start processes with 1024, which raw connections exhaust quickly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = limit if hard == resource.RLIM_INFINITY else min(hard, limit)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse; the old limit still works
            pass
    return soft


class ListenError(OSError):
    """The inbox cannot bind its configured address (bad input: exit code 2)."""


class StageTimeout(RuntimeError):
    """A peer was silent for longer than the scenario's runtime.timeout_s."""


class RemoteError(RuntimeError):
    """A peer reported a failure (its traceback is in the message)."""


class Gate(ThreadAuthenticator):
    """The inbox's ZAP handler. It logs the first refusal of each address to stderr, so a board
    whose address is not the one runtime.hosts gives (a second network interface, say) or whose
    key is not in runtime.keys is named, not only unheard. (A plain peer knocking on a CURVE inbox
    fails before ZAP is asked, so it goes unlogged.)"""

    def __init__(self, context: zmq.Context, rank: int) -> None:
        super().__init__(context)
        self.rank = rank
        self.refused: dict[str, str] = {}  # address -> pyzmq's reason, first refusals only
        self._address = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = "anonymous") -> None:
        # pyzmq sends every verdict through here, and one request is handled at a time
        address = self._address
        if status_code != b"200" and address not in self.refused and len(self.refused) < MAX_LOGGED_REFUSALS:
            self.refused[address] = status_text.decode(errors="replace")
            print(f"rank {self.rank}: refused a connection from {address} ({self.refused[address]}): not one of "
                  "runtime.hosts, or without a key from runtime.keys", file=sys.stderr, flush=True)  # fmt: skip
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


class Endpoint:
    def __init__(self, rank: int, host: str = "127.0.0.1", port: int = 0, bind_host: str | None = None, *,
                 max_header_nbytes: int = wire.MAX_HEADER_NBYTES, max_frame_nbytes: int = -1,
                 keyring: Keyring | None = None, allowed: tuple[str, ...] = ()) -> None:  # fmt: skip
        """Bind the inbox on `bind_host` (default: `host`) at `port` (0: a free port); a peer that
        sends a frame over `max_frame_nbytes` (-1: no bound) is disconnected. `keyring`: CURVE on
        the inbox and on every PUSH socket; `allowed`: the only IP addresses the inbox hears
        (empty: any)."""
        self.rank = rank
        self.max_header_nbytes = max_header_nbytes
        self.keyring = keyring
        # pyzmq's handler names a CURVE client by its Z85 public key: the frames' "User-Id"
        self._rank_of_key = {} if keyring is None else {key.decode(): r for r, key in enumerate(keyring.peers)}
        self.context = zmq.Context()
        self.auth: Gate | None = None
        if keyring is not None or allowed:
            self.auth = Gate(self.context, rank)
            self.auth.start()
            if allowed:
                self.auth.allow(*allowed)
            if keyring is not None:
                self.auth.configure_curve(domain=ZAP_DOMAIN.decode(), location=str(keyring.folder))  # pyzmq: no "*" wildcard here
        self.inbox = self.context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, max_frame_nbytes)
        self.inbox.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.inbox.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        self.inbox.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
        self.inbox.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        if self.auth is not None:
            self.inbox.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        if keyring is not None:
            self.inbox.setsockopt(zmq.CURVE_SERVER, 1)
            self.inbox.setsockopt(zmq.CURVE_PUBLICKEY, keyring.public)
            self.inbox.setsockopt(zmq.CURVE_SECRETKEY, keyring.secret)
        where = f"tcp://{bind_host or host}"
        try:
            if port:
                self.inbox.bind(f"{where}:{port}")
            else:
                port = self.inbox.bind_to_random_port(where)
        except zmq.ZMQError as e:
            self.inbox.close(linger=0)
            self._stop_auth()
            self.context.term()
            if e.errno == errno.EADDRINUSE and port:  # bad input: a testbed's configured port is taken
                raise ListenError(f"rank {rank}: cannot listen on {where}:{port}: the port is in use (it is "
                                  f"runtime.base_port + {rank}: another run or program holds it; choose another "
                                  "runtime.base_port)") from None  # fmt: skip
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
        if self.keyring is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.keyring.peers[rank])
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keyring.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.keyring.secret)
        sock.connect(address)
        self.peers[rank] = sock

    def send(self, rank: int, frames: list[bytes | memoryview]) -> None:
        self.peers[rank].send_multipart(frames, copy=False)

    def send_all(self, frames: list[bytes | memoryview]) -> None:
        for sock in self.peers.values():
            sock.send_multipart(frames, copy=False)

    def recv(self, timeout_s: float) -> wire.Message | None:
        """The next message, or None if none arrived within `timeout_s` (0: do not wait); a frame
        that fails validation raises `ProtocolError` (it is consumed: the next call goes on)."""
        if not self.poller.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self.inbox.recv_multipart(copy=False)
        msg = wire.decode(frames, sender_hint=f"a peer of rank {self.rank}", max_header_nbytes=self.max_header_nbytes)
        if self.keyring is not None:
            rank = self._rank_of_key.get(frames[0].get("User-Id"))
            if rank != msg.sender:
                holder = "a key no rank of this run holds" if rank is None else f"the key of rank {rank}"
                raise ProtocolError(f"{msg.type} message from rank {msg.sender}: came with {holder}")
        return msg

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close(linger=LINGER_MS)
        self.inbox.close(linger=0)
        self._stop_auth()
        self.context.term()

    def _stop_auth(self) -> None:
        """Stop the ZAP handler's thread; its socket is on this context, so before `term`."""
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
