"""Only the scenario's peers are heard (issue 16): `runtime.security: curve` with keys from
`flowspec keys` authenticates and encrypts every connection, and a run with keys is lossless; a
peer without the testbed's keys is not heard at all; a testbed inbox hears only its hosts'
addresses; missing keys are bad input (exit 2) naming the key and the file.

The attacks run on a 3-stage loopback cluster of the tiny random Llama: a PUSH socket of the test's
own connects to stage 1's inbox and sends what would be rejected (random bytes) and what would be
obeyed (a prompt chunk claiming to come from D0) if it were heard. A client holding D0's keys
sends the same junk as a control, so the count that stays 0 could have moved; one holding stage
3's key claims D0's rank, which the key it came with contradicts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq
import zmq.auth
from click.testing import CliRunner

from cli import main
from flowspec.config import Policy, ScenarioError, scenario_from_dict
from flowspec.lookup import PromptLookupDrafter
from flowspec.messages import Segment, SegmentKind
from flowspec.workload import one_after_another
from runtime import wire
from runtime.channel import Endpoint
from runtime.launcher import Cluster, Target, stage_scenario
from runtime.security import make_keys, peer_addresses

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).parents[2]
TINY_YAML = str(ROOT / "scenarios" / "tiny.yaml")
N_JUNK = 50  # random frames per sender


def secured(tiny, keys: Path, n_stages: int = 3):
    return scenario_from_dict({
        "pipeline": {"n_stages": n_stages},
        "decoding": {"max_new_tokens": tiny.n_new},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 20, "security": "curve",
                    "keys": str(keys)},
    })  # fmt: skip


def prompt_chunk() -> list[bytes]:
    """A well-formed first-hop segment from D0: a stage that hears it forwards it to the next stage."""
    n = 12
    seg = Segment(request_id=0, round=-1, segment_id=0, kind=SegmentKind.PREFILL, node_ids=np.full(n, -1),
                  tokens=np.arange(n) * 3, parent_ids=np.full(n, -1), positions=np.arange(n), version=0, reset=True,
                  final=True)  # fmt: skip
    return [bytes(f) for f in wire.encode_segment(seg, 0)]


def attack(push: zmq.Socket, rng: np.random.Generator) -> None:
    push.send_multipart(prompt_chunk())
    for _ in range(N_JUNK):
        push.send_multipart([rng.bytes(int(rng.integers(1, 300))) for _ in range(int(rng.integers(1, 4)))])


def curve_client(ctx: zmq.Context, address: str, server_key: bytes, public: bytes, secret: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
    sock.connect(address)
    return sock


def test_the_keys_command_writes_a_pair_for_d0_and_each_stage(tmp_path: Path) -> None:
    """`flowspec keys --stages 3`: four pairs, each a loadable CURVE pair, secrets readable by the
    owner only; run again into the same folder it refuses (exit 2) rather than replace a testbed's keys."""
    out = tmp_path / "keys"
    result = CliRunner().invoke(main, ["keys", "--out", str(out), "--stages", "3"])
    assert result.exit_code == 0, result.output
    names = ["d0", "stage1", "stage2", "stage3"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.key" for n in names] + [f"{n}.key_secret" for n in names])
    publics = set()
    for name in names:
        public, secret = zmq.auth.load_certificate(out / f"{name}.key_secret")
        assert len(public) == 40 and len(secret) == 40
        assert zmq.auth.load_certificate(out / f"{name}.key") == (public, None)
        assert zmq.curve_public(secret) == public
        assert (out / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
        publics.add(public)
    assert len(publics) == 4
    again = CliRunner().invoke(main, ["keys", "--out", str(out), "--stages", "3"])
    assert again.exit_code == 2 and "d0.key exists" in again.stderr


def test_missing_keys_are_bad_input_naming_the_key_and_the_file(tiny, tmp_path: Path) -> None:
    """security: curve without runtime.keys, and a keys folder without a stage's public key or
    without the process's own secret: one line naming runtime.keys and the file, exit 2."""
    with pytest.raises(ScenarioError, match=r"^<dict>: runtime\.keys must name a folder of keys when security is curve"):
        scenario_from_dict({"runtime": {"security": "curve"}})
    runner = CliRunner()
    base = ["run", TINY_YAML, "--set", f"runtime.model={tiny.folder}", "--no-plots", "--no-stream"]
    result = runner.invoke(main, [*base, "--set", "runtime.security=curve", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2, result.output
    assert "runtime.keys must name a folder of keys when security is curve" in result.stderr
    keys = tmp_path / "keys"
    make_keys(keys, 3)
    (keys / "stage2.key").unlink()
    result = runner.invoke(main, [*base, "--set", "runtime.security=curve", "--set", f"runtime.keys={keys}",
                                  "--out", str(tmp_path / "b")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: runtime.keys: {keys.resolve()}/stage2.key is missing" in result.stderr
    assert "Traceback" not in result.output
    board = tmp_path / "board1"  # a board given every key but its own secret
    make_keys(board, 3)
    (board / "stage1.key_secret").unlink()
    result = runner.invoke(main, ["stage", TINY_YAML, "--rank", "1", "--set", f"runtime.model={tiny.folder}",
                                  "--set", "runtime.hosts=[127.0.0.1, 127.0.0.1, 127.0.0.1, 127.0.0.1]",
                                  "--set", "runtime.base_port=23999", "--set", "runtime.security=curve",
                                  "--set", f"runtime.keys={board}"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: runtime.keys: {board.resolve()}/stage1.key_secret is missing" in result.stderr


def test_a_curve_run_is_lossless_and_a_peer_without_the_keys_is_not_heard(tiny, tmp_path: Path) -> None:
    """Three CURVE stages decode the target's greedy output. A plain ZeroMQ peer and a CURVE peer
    whose key is not in the folder each send stage 1 a prompt chunk claiming to be D0's and
    random frames: the chunk never comes round to D0 and no frame is counted. A peer holding
    stage 3's key is heard, but its chunk claiming D0's rank is rejected; the control, which holds
    D0's keys, gets every junk frame counted as rejected."""
    keys = tmp_path / "keys"
    make_keys(keys, 3)
    target = Target.load(secured(tiny, keys))
    rng = np.random.default_rng(16)
    requests = one_after_another(tiny.prompts)
    ctx = zmq.Context()
    try:
        with Cluster(stage_scenario(target.scenario, Policy.FLOWSPEC), target) as cluster:
            stage1 = cluster.node.addresses[1]
            server_key = zmq.auth.load_certificate(keys / "stage1.key")[0]
            plain = ctx.socket(zmq.PUSH)
            plain.setsockopt(zmq.LINGER, 0)
            plain.connect(stage1)
            stranger = curve_client(ctx, stage1, server_key, *zmq.curve_keypair())
            for push in (plain, stranger):
                attack(push, rng)
            insider = curve_client(ctx, stage1, server_key, *zmq.auth.load_certificate(keys / "stage3.key_secret"))
            insider.send_multipart(prompt_chunk())  # a testbed key, but D0's rank claimed: rejected
            deadline = time.monotonic() + 2.0  # a chunk that was obeyed is back at D0 in milliseconds
            while time.monotonic() < deadline:
                msg = cluster.endpoint.recv(0.1)
                assert msg is None or msg.type == "status", msg  # the stages' heartbeats only
            control = curve_client(ctx, stage1, server_key, *zmq.auth.load_certificate(keys / "d0.key_secret"))
            for _ in range(N_JUNK):
                control.send_multipart([rng.bytes(64)])
            time.sleep(0.5)
            result = cluster.serve(stage_scenario(target.scenario, Policy.FLOWSPEC), PromptLookupDrafter(tiny.vocab), requests)
            assert [result.outputs[0], result.outputs[1]] == tiny.outputs
            assert cluster.node.rejected == {1: 1 + N_JUNK, 2: 0, 3: 0}  # the insider's chunk and the control's junk
            log = cluster.logs[1].read_text()
            assert "rejected frame #1: segment message from rank 0: came with the key of rank 3" in log
            assert "rank 1: refused a connection from 127.0.0.1 (Unknown key)" in log  # the stranger, named
            procs = list(cluster.procs.values())
    finally:
        ctx.destroy(linger=0)
    assert [p.poll() for p in procs] == [0, 0, 0]  # stopped cleanly


def test_an_inbox_hears_only_the_allowed_addresses(capfd: pytest.CaptureFixture[str]) -> None:
    """An inbox allowed 127.0.0.2 only: a plain peer connecting from 127.0.0.1 is not heard, and
    named once on stderr however often it reconnects; one connecting from 127.0.0.2 is heard.
    Host names resolve to the addresses they name."""
    heartbeat = wire.encode("heartbeat", 0, {"clock_s": 1.0})
    inbox = Endpoint(1, allowed=("127.0.0.2",))
    ctx = zmq.Context()
    try:
        port = inbox.address.rsplit(":", 1)[1]
        outsider, insider = ctx.socket(zmq.PUSH), ctx.socket(zmq.PUSH)
        for sock in (outsider, insider):
            sock.setsockopt(zmq.LINGER, 0)
        outsider.connect(f"tcp://127.0.0.1:{port}")
        insider.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port}")  # ZeroMQ's source-address syntax
        outsider.send_multipart(heartbeat)
        assert inbox.recv(1.0) is None
        insider.send_multipart(heartbeat)
        msg = inbox.recv(2.0)
        assert msg is not None and msg.type == "heartbeat"
        assert inbox.recv(0.5) is None  # the outsider's message is still not heard
    finally:
        ctx.destroy(linger=0)
        inbox.close()
    err = capfd.readouterr().err
    assert err.count("rank 1: refused a connection from 127.0.0.1 (Address not allowed): not one of runtime.hosts") == 1, err
    assert {"127.0.0.1", "127.0.0.2"} <= set(peer_addresses(("localhost", "127.0.0.2")))
    with pytest.raises(ScenarioError, match=r"^runtime\.hosts: cannot resolve 'no-such-board\.invalid'"):
        peer_addresses(("no-such-board.invalid",))


def free_base_port(n: int) -> int:
    """A port p with p..p+n-1 all free right now."""
    for base in range(24000, 60000, 89):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def test_a_secured_testbed_with_keys_relative_to_its_scenario(tiny, tmp_path: Path) -> None:
    """`flowspec run` as D0 and `flowspec stage` per board, CURVE on, runtime.keys relative to the
    scenario file and the commands run from elsewhere: the run completes with the target's tokens."""
    make_keys(tmp_path / "keys", 2)
    spec = tmp_path / "testbed.yaml"
    spec.write_text(yaml.safe_dump({
        "pipeline": {"n_stages": 2},
        "decoding": {"max_new_tokens": tiny.n_new},
        "workload": {"n_requests": 1, "prompt_tokens": 12},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 10, "security": "curve",
                    "keys": "keys", "hosts": ["127.0.0.1"] * 3, "base_port": free_base_port(3)},
    }))  # fmt: skip
    cli = [sys.executable, "-m", "cli"]
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    env_root = {"cwd": elsewhere, "env": {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}}
    procs = []
    try:
        d0 = subprocess.Popen([*cli, "run", str(spec), "--policy", "flowspec", "--no-plots", "--no-stream", "--out",
                               str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              **env_root)  # fmt: skip
        procs.append(d0)
        for rank in (1, 2):
            procs.append(subprocess.Popen([*cli, "stage", str(spec), "--rank", str(rank)], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, **env_root))  # fmt: skip
        out, _ = d0.communicate(timeout=120)
        assert d0.returncode == 0, out
        assert "flowspec: 20 tokens" in out, out
        for stage in procs[1:]:
            stage_out, _ = stage.communicate(timeout=10)
            assert stage.returncode == 0 and "CURVE on" in stage_out, stage_out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
