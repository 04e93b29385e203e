"""`flowspec profile device` on the tiny random Llama: a profile the simulator loads and charges.

Timings differ from one CPU (and one load average) to the next, so these tests pin structure —
components, grids, provenance, what the simulator charges with them — never a latency.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig

import cli
from flowspec.config import Scenario
from runtime.eagle import EagleHead, save_eagle
from runtime.profiling import Point, Timer, sample_points
from flowspec.costs import DeviceProfile
from sim.experiment import build_engine
from flowspec.platform import ProfiledPlatform

GRID = ["n_tokens=1,4,16", "kv_len=0,48", "draft_rows=1,4", "draft_context=2,24", "tree_size=1,8,32"]


@pytest.fixture(scope="module")
def measured(tiny, tmp_path_factory) -> tuple[Path, object]:
    """One run of the command: EAGLE head over even token ids with prompt lookup, a 3 s budget."""
    folder = tmp_path_factory.mktemp("profile")
    torch.manual_seed(2)
    head = EagleHead(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2))
    save_eagle(head, folder / "head", draft_vocab=torch.arange(0, tiny.vocab, 2))
    out = folder / "tiny-cpu" / "tiny-llama"
    args = ["profile", "device", "--model", str(tiny.folder), "--drafter", "eagle", "--draft-model", str(folder / "head"),
            "--budget-s", "3", "--out", str(out)] + [a for g in GRID for a in ("--grid", g)]  # fmt: skip
    result = CliRunner().invoke(cli.main, args)
    return out, result


def test_the_command_writes_a_profile_the_simulator_loads(measured, tiny) -> None:
    """Pins: every component on exactly the grid asked for, samples behind every point, and a card
    that says which machine, stack, drafter and command made it."""
    out, result = measured
    assert result.exit_code == 0, result.output + str(result.exception)
    assert f"wrote {out}" in result.output
    p = DeviceProfile.load(out)
    axes = {name: (g.n_axis, g.kv_axis) for name, g in p.grids.items()}
    assert axes == {
        "layer": ((1, 4, 16), (0, 48)), "stage_overhead": ((1, 4, 16), (0, 48)), "embed": ((1, 4, 16), (0,)),
        "head": ((1, 4, 16), (0,)), "draft": ((1, 4), (2, 24)), "d0_step": ((1, 8, 32), (0,)),
    }  # fmt: skip
    rows = (out / "stage_forward.csv").read_text().splitlines()[1:]
    assert all(int(r.split(",")[-1]) >= 3 for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["device"], meta["model"], meta["source"], meta["dtype"]) == ("tiny-cpu", "tiny-llama", "measured", "float32")
    assert (meta["n_layers"], meta["hidden_size"], meta["vocab_size"], meta["threads"]) == (5, 64, tiny.vocab, 1)
    assert meta["torch_device"] == "cpu" and meta["cpu_model"] and meta["gpu_name"] is None
    assert meta["command"].startswith("flowspec profile device --model") and meta["command"] in meta["method"]
    assert meta["drafter"] == {"kind": "eagle", "prompt_lookup": True, "draft_model": str(out.parent.parent / "head"),
                               "draft_vocab": (tiny.vocab + 1) // 2, "topk": 10, "device": "cpu"}  # fmt: skip
    assert len(meta["load_average"]["start"]) == 3 and "Load average" in meta["notes"]


def test_the_simulator_charges_every_component(measured) -> None:
    """Pins how ProfiledPlatform uses a measured profile: stage 1 = 2 layers + embedding + overhead,
    stage 2 = 3 layers + overhead, D0's head, drafter and per-step bookkeeping; and a simulation on
    it spends exactly d0_step(tree size) in each "step" span."""
    out, _ = measured
    scenario = Scenario(
        pipeline={"n_stages": 2}, model={"n_layers": 5, "hidden_size": 64, "vocab_size": 97},
        tree={"total": 6, "topk": 2, "depth": 2, "segment_size": 4}, expansion={"total": 4, "topk": 2, "depth": 1},
        decoding={"max_new_tokens": 10}, workload={"prompt_tokens": 8},
        devices={"draft": str(out), "stage": str(out)},
    )  # fmt: skip
    platform, p = ProfiledPlatform(scenario), DeviceProfile.load(out)
    assert platform.stage_ms(1, 4, 20) == pytest.approx(2 * p.layer_ms(4, 20) + p.embed_ms(4) + p.stage_overhead_ms(4, 20))
    assert platform.stage_ms(2, 4, 20) == pytest.approx(3 * p.layer_ms(4, 20) + p.stage_overhead_ms(4, 20))
    assert platform.verify_ms(3) == p.head_ms(3) and platform.draft_ms(2, 6, 10) == pytest.approx(2 * p.draft_ms(3, 10))
    assert platform.step_ms(8) == p.d0_step_ms(8) > 0
    spans = build_engine(scenario, platform=platform).run().frames()["stage_spans"]
    steps = spans[spans.kind == "step"]
    assert len(steps) >= 2 and (steps.stage == 0).all()
    for r in steps.itertuples():
        assert (r.t_end_s - r.t_start_s) * 1000 == pytest.approx(p.d0_step_ms(int(r.n_tokens)), rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "error: --model: '/no/such/model' is neither"),
    (["--device", "tpu"], "error: --device: unknown device 'tpu' (known: cpu, cuda, mps, auto)"),
    (["--dtype", "float64"], "error: --dtype: unknown dtype 'float64' (known: float32, float16, bfloat16)"),
    (["--drafter", "medusa"], "error: --drafter: unknown drafter 'medusa'"),
    (["--grid", "kv=0,1"], "error: --grid 'kv=0,1': expected KEY=V1,V2,... with KEY one of n_tokens, kv_len"),
    (["--grid", "n_tokens=0,4"], "error: --grid n_tokens: values must be integers >= 1, got '0,4'"),
    (["--budget-s", "0"], "error: --budget-s must be > 0, got 0.0"),
])
def test_bad_input_is_an_error_line_and_exit_2(tmp_path, args, message) -> None:
    """Pins: bad input is reported in one line naming the option, exit code 2, nothing written."""
    result = CliRunner().invoke(cli.main, ["profile", "device", "--out", str(tmp_path / "p"), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message)
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_an_absent_device_is_named(tmp_path) -> None:
    """Pins: asking for CUDA where torch sees none fails before any model loads."""
    result = CliRunner().invoke(cli.main, ["profile", "device", "--device", "cuda", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "error: --device cuda: " in result.stderr and "sees no CUDA device" in result.stderr


def test_the_grid_thins_to_fit_the_budget_and_says_so() -> None:
    """Pins the budget rule: when even 3 samples per point would overrun, every other interior value
    of the longer axis goes, ends kept, until it fits or only the corners are left (here the
    warm-up alone overruns the budget, so it always comes down to the corners); the note names
    every value dropped."""
    def busy(ms: float):
        def call() -> None:
            end = time.perf_counter() + ms / 1000
            while time.perf_counter() < end:
                pass
        return call
    points = [Point(n, kv, busy(5.0)) for kv in (0, 10, 20) for n in (1, 2, 3, 4, 5)]
    samples, note = sample_points("toy", points, 0.05, Timer(torch.device("cpu")))
    assert sorted(samples) == [(1, 0), (1, 20), (5, 0), (5, 20)]
    assert all(len(s) == 3 for s in samples.values())
    assert "grid thinned" in note and all(f"n_tokens {n}" in note for n in (2, 3, 4)) and "kv_len 10" in note
