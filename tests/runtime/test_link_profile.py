"""`flowspec profile link` on loopback: the real listener process, the real peer command, a profile
the simulator loads. No timing is asserted: CPUs and loads differ between machines."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

import cli
from runtime.link_profile import parse_address, parse_sizes
from flowspec.links import TRANSFER_COLUMNS
from flowspec.links import LinkProfile, ProfiledLink

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(60)]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[str, int]]:
    """`flowspec profile link --listen 127.0.0.1:0` as a child process; always ended, even when a
    test fails. Yields (host, port) once it has printed its address."""
    exe = shutil.which("flowspec")
    cmd = [exe] if exe else [sys.executable, str(ROOT / "cli.py")]
    proc = subprocess.Popen([*cmd, "profile", "link", "--listen", "127.0.0.1:0", "--duration-s", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
    try:
        line = proc.stdout.readline()  # the listener prints its address once bound, or dies saying why
        m = re.search(r"listening on tcp://127\.0\.0\.1:(\d+)", line)
        assert m, f"listener did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
        yield "127.0.0.1", int(m[1])
        assert proc.poll() is None, "the listener died during the tests"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()


def test_measured_loopback_profile_loads_and_prices_messages(listener, tmp_path):
    """The peer command measures a 3-size grid within its budget and writes a profile that
    `flowspec.links` validates; its card names both hosts and the stack; the simulator prices each
    measured size at its measured one-way time and more bytes beyond the grid at more time."""
    host, port = listener
    out = tmp_path / "links" / "lo"
    result = CliRunner().invoke(cli.main, ["profile", "link", "--peer", f"{host}:{port}", "--out", str(out),
                                           "--sizes", "16,4K,64K", "--budget-s", "1.5", "--notes", "a test"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"wrote {out}/" in result.stdout
    profile = LinkProfile.load(out)
    assert profile.nbytes.tolist() == [16, 4096, 65536]
    meta = profile.meta
    assert meta["link"] == "lo" and meta["source"] == "measured" and meta["notes"] == "a test"
    for side in ("listener", "peer"):
        assert meta[side]["hostname"] == socket.gethostname()
        assert meta[side]["pyzmq_version"] == zmq.__version__ and meta[side]["libzmq_version"] == zmq.zmq_version()
    assert "--listen 127.0.0.1:0" in meta["listener"]["command"]
    assert meta["method"].startswith(f"flowspec profile link --peer {host}:{port} --out {out} --budget-s 1.5 --sizes 16,4K,64K")
    with open(out / "transfer.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()]
    assert tuple(rows[0]) == TRANSFER_COLUMNS
    assert all(int(r[4]) >= 5 and int(r[6]) >= 4 for r in rows[1:])  # the minimum samples per size
    link = ProfiledLink(profile)
    for n, w in zip(profile.nbytes, profile.one_way_ms):
        assert link.send_ms(int(n)) + link.latency_ms == pytest.approx(w)
    assert link.send_ms(1 << 20) > link.send_ms(65536)


def test_listener_drops_a_malformed_message_and_keeps_serving(listener):
    """A message of an unknown kind is logged and dropped; the next echo is still answered."""
    host, port = listener
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{host}:{port}")
        sock.send_multipart([b"garbage", b"x" * 10])
        sock.send_multipart([b"echo", b"abc"])
        assert sock.poll(5000), "no echo after a malformed message"
        assert sock.recv_multipart() == [b"echo", b"abc"]


def test_peer_without_listener_fails_naming_the_address(tmp_path):
    """No listener: exit 1 with one line that names the address, after --timeout-s, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed
    result = CliRunner().invoke(cli.main, ["profile", "link", "--peer", f"127.0.0.1:{port}", "--out",
                                           str(tmp_path / "x"), "--timeout-s", "0.3"])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: tcp://127.0.0.1:{port}: no answer within 0.3 s")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --listen"),
    (["--listen", "0", "--peer", "h:1"], "give exactly one of --listen"),
    (["--peer", "h:1"], "--peer needs --out"),
    (["--listen", "0", "--out", "x"], "--out and --sizes go with --peer"),
    (["--peer", "h:1", "--out", "x", "--duration-s", "3"], "--duration-s goes with --listen"),
    (["--peer", "1234", "--out", "x"], "address must look like HOST:PORT"),
    (["--listen", "h:99999"], "address must look like [HOST:]PORT"),
    (["--peer", "h:1", "--out", "x", "--sizes", "64,1K,1K"], "sizes must be ascending and distinct"),
    (["--peer", "h:1", "--out", "x", "--sizes", "64,big"], "sizes must be positive byte counts"),
])  # fmt: skip
def test_bad_options_exit_2(args, message):
    result = CliRunner().invoke(cli.main, ["profile", "link", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_parsers():
    assert parse_sizes("16, 4K,1MiB,2M") == (16, 4096, 1 << 20, 2 << 20)
    assert parse_address("5555", default_host="0.0.0.0") == ("0.0.0.0", 5555)
    assert parse_address("board-2:5555", default_host=None) == ("board-2", 5555)
    assert parse_address("[::1]:5555", default_host=None) == ("::1", 5555)
