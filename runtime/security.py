"""Who a process hears: CURVE keys (`runtime.security: curve`) and the testbed's peer addresses.

Theory of operation
-------------------
Every process of a run — D0 (rank 0) and stages 1..N — has one CURVE key pair, named by rank:
`d0`, `stage1`, ..., `stageN`, written by `make_keys` as `<name>.key` (public) and
`<name>.key_secret` (public and secret) in ZeroMQ's certificate format. A process's `Keyring` is
its own pair plus every process's public key, read from the folder `runtime.keys` names: its
inbox is a CURVE server that accepts a client only if the client's public key is one of the
`*.key` files in that folder (`runtime.channel.Endpoint`), and each PUSH socket it connects proves
its own key and checks the peer's; a key speaks for its own rank only (`Endpoint.recv` rejects a
message that claims another). So a board needs its own secret file and every public file; a
folder holding the other boards' secrets works too, but gives them away.

On a testbed (`runtime.hosts` set) an inbox also hears only the scenario's host addresses,
resolved to IPs once at start-up (`peer_addresses`), whether or not CURVE is on. On loopback every
peer is 127.0.0.1, so there is nothing to filter.

Keys are input like a scenario: a missing or unreadable file is a `ScenarioError` naming
runtime.keys and the file, found before any process starts.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from flowspec.config import Scenario, ScenarioError, Security

MAKE_KEYS = "flowspec keys --out DIR --stages N"


class KeysError(ValueError):
    """`flowspec keys` cannot write its keys (bad input: exit code 2)."""


def key_name(rank: int) -> str:
    """The file stem of rank `rank`'s keys: d0, stage1, stage2, ..."""
    return "d0" if rank == 0 else f"stage{rank}"


def make_keys(folder: Path, n_stages: int) -> list[Path]:
    """Write one CURVE key pair for D0 and one per stage into `folder`; the files written. Refuses
    to overwrite keys: a testbed whose boards hold the old ones would stop hearing each other."""
    if not zmq.has("curve"):
        raise KeysError(f"this libzmq ({zmq.zmq_version()}) was built without CURVE; install a pyzmq wheel, which bundles it")
    names = [key_name(rank) for rank in range(n_stages + 1)]
    for name in names:
        for path in (folder / f"{name}.key", folder / f"{name}.key_secret"):
            if path.exists():
                raise KeysError(f"{path} exists: remove the old keys or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(folder, name)
        os.chmod(secret, 0o600)  # pyzmq writes it with the umask's permissions
        written += [Path(public), Path(secret)]
    return written


@dataclass(frozen=True, slots=True)
class Keyring:
    """One process's CURVE keys, Z85-encoded: its own pair and every process's public key."""

    folder: Path  # every `*.key` in it is a client the inbox accepts
    public: bytes
    secret: bytes = field(repr=False)  # a logged plan or traceback must not show it
    peers: tuple[bytes, ...]  # public keys by rank, D0 first

    @classmethod
    def load(cls, folder: Path, rank: int, n_stages: int) -> Keyring:
        """Rank `rank`'s keys from `folder`, for a run of `n_stages` stages."""
        if not zmq.has("curve"):
            raise ScenarioError(f"runtime.security: curve, but this libzmq ({zmq.zmq_version()}) was built without CURVE")
        if not folder.is_dir():
            raise ScenarioError(f"runtime.keys: {folder} is not a folder (make keys with `{MAKE_KEYS}`)")
        peers = tuple(_read(folder / f"{key_name(r)}.key", secret=False)[0] for r in range(n_stages + 1))
        public, secret = _read(folder / f"{key_name(rank)}.key_secret", secret=True)
        if public != peers[rank]:
            raise ScenarioError(f"runtime.keys: {folder}/{key_name(rank)}.key_secret and {key_name(rank)}.key are not one pair")
        return cls(folder, public, secret, peers)


def _read(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    what = "this process's secret key" if secret else "a public key (every board needs every process's)"
    if not path.is_file():
        raise ScenarioError(f"runtime.keys: {path} is missing: {what}; make keys with `{MAKE_KEYS}`")
    try:
        public, private = zmq.auth.load_certificate(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"runtime.keys: {path} is not a ZeroMQ key file ({e})") from None
    if len(public or b"") != 40 or (secret and len(private or b"") != 40):
        raise ScenarioError(f"runtime.keys: {path} holds no {'secret' if secret else 'public'} CURVE key")
    return public, private


def keyring_for(scenario: Scenario, rank: int) -> Keyring | None:
    """Rank `rank`'s keys when runtime.security is curve (runtime.keys resolved already:
    `with_keys_resolved`), else None."""
    rt = scenario.runtime
    if rt.security is not Security.CURVE:
        return None
    assert rt.keys is not None  # the config requires it
    return Keyring.load(Path(rt.keys), rank, scenario.pipeline.n_stages)


def with_keys_resolved(scenario: Scenario, base_dir: Path | None) -> Scenario:
    """`scenario` with runtime.keys made absolute (relative paths start at `base_dir`, the
    scenario's folder), so that a stage started from a copy of the scenario elsewhere finds them."""
    keys = scenario.runtime.keys
    if keys is None:
        return scenario
    path = Path(keys).expanduser()
    path = (path if path.is_absolute() or base_dir is None else base_dir / path).resolve()
    return dataclasses.replace(scenario, runtime=dataclasses.replace(scenario.runtime, keys=str(path)))


def peer_addresses(hosts: Sequence[str]) -> tuple[str, ...]:
    """The IP addresses of the testbed's hosts: the only ones a testbed inbox hears."""
    ips: set[str] = set()
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise ScenarioError(f"runtime.hosts: cannot resolve {host!r} ({e})") from None
        ips.update(str(info[4][0]) for info in infos)
    return tuple(sorted(ips))
