"""Testbed mode on one machine: `flowspec run` as D0 and one `flowspec stage --rank R` per stage,
wired by runtime.hosts and base_port from the same scenario file, as on real boards."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).parents[2]


def free_base_port(n: int) -> int:
    """A port p with p..p+n-1 all free right now."""
    for base in range(23000, 60000, 97):
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


def test_one_command_per_board(tiny, tmp_path: Path) -> None:
    n_stages = 2
    spec = tmp_path / "testbed.yaml"
    spec.write_text(yaml.safe_dump({
        "pipeline": {"n_stages": n_stages},
        "decoding": {"max_new_tokens": tiny.n_new},
        "tree": {"total": 6, "topk": 2, "depth": 2, "segment_size": 3},
        "expansion": {"total": 4, "topk": 2, "depth": 1},
        "workload": {"n_requests": 2, "prompt_tokens": 12},
        "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 10,
                    "hosts": ["127.0.0.1"] * (n_stages + 1), "base_port": free_base_port(n_stages + 1)},
    }))  # fmt: skip
    cli = [sys.executable, "-m", "cli"]
    procs = []
    try:
        d0 = subprocess.Popen([*cli, "run", str(spec), "--policy", "flowspec", "--policy", "ar-pp", "--no-plots",
                               "--no-stream", "--out", str(tmp_path / "out")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        procs.append(d0)
        time.sleep(1.0)  # stages may start before or after D0; this order is the common one
        for rank in range(1, n_stages + 1):
            procs.append(subprocess.Popen([*cli, "stage", str(spec), "--rank", str(rank)], cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
        out, _ = d0.communicate(timeout=180)
        assert d0.returncode == 0, out
        assert "listening at tcp://127.0.0.1:" in out and "ar-pp: 40 tokens" in out and "same tokens as flowspec" in out
        for stage in procs[1:]:
            stage_out, _ = stage.communicate(timeout=10)
            assert stage.returncode == 0, stage_out  # told to stop by D0
        steps = pd.read_parquet(tmp_path / "out" / "flowspec" / "stage_spans.parquet")
        assert set(steps.stage) == {0, 1, 2}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
