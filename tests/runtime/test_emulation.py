"""The emulated testbed: links paced to bandwidth / k, compute padded to k x its profiled time.

The link test needs no model: two endpoints on loopback, one paced. The cluster tests run the tiny
random Llama on real stage processes under a hand-written profile (flat costs, so every expected
duration is arithmetic) and check the spans, the computes and the overrun counter.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from cli import main
from flowspec import metrics
from flowspec.config import Policy, scenario_from_dict
from flowspec.records import ComputeRecord, to_frame
from flowspec.platform import build_platform
from flowspec.synthetic import ReferenceDrafter
from flowspec.workload import one_after_another
from runtime import wire
from runtime.channel import Endpoint
from runtime.emulation import Emulation, PacedEndpoint, dilation_for
from runtime.launcher import Cluster, Target, stage_scenario
from runtime.outputs import overrun_summary

pytestmark = pytest.mark.runtime


def test_a_paced_link_takes_k_times_bytes_over_bandwidth() -> None:
    """Three 250 kB messages back to back on a 100 Mbps, 5 ms link at k = 2: each holds the link
    2 x 20 ms, then travels 2 x 5 ms, so they arrive 50, 90 and 130 ms after the first send."""
    k, rate_mbps, latency_ms, nbytes = 2.0, 100.0, 5.0, 250_000
    sc = scenario_from_dict({"emulate": {"dilation": k},
                             "network": {"bandwidth_mbps": rate_mbps, "latency_ms": latency_ms, "overhead_ms": 0}})  # fmt: skip
    emulation = Emulation.of(sc)
    assert emulation is not None
    serial_s = k * nbytes * 8 / (rate_mbps * 1e6)
    expected = [i * serial_s + k * latency_ms / 1000 for i in (1, 2, 3)]
    for _attempt in range(3):  # pacing never delivers early; a busy shared machine can deliver late
        arrivals, transfers = _three_paced_messages(emulation, nbytes)
        if all(abs(t - e) <= 0.1 * e for t, e in zip(arrivals, expected)):
            break
    assert all(abs(t - e) <= 0.1 * e for t, e in zip(arrivals, expected)), (arrivals, expected)
    assert [round(t[3] - transfers[0][3], 3) for t in transfers] == [0.0, 0.04, 0.08]


def _three_paced_messages(emulation: Emulation, nbytes: int) -> tuple[list[float], list[tuple]]:
    """Arrival times of three paced messages sent back to back, after the first send, and the
    sender's transfer records."""
    receiver, sender = Endpoint(1), Endpoint(0)
    try:
        sender.connect(1, receiver.address)
        paced = PacedEndpoint(sender, emulation, 0)
        paced.send(1, wire.encode("heartbeat", 0, {"clock_s": 0.0}))  # control: at once, and warms the socket
        assert receiver.recv(2.0) is not None
        t0 = time.monotonic()
        for _ in range(3):
            paced.send_paced(1, wire.encode("heartbeat", 0, {"clock_s": 0.0}), nbytes, "segment")
        arrivals = []
        while len(arrivals) < 3:
            paced.recv(0.0005)  # the sender's loop: releases what fell due
            if receiver.recv(0.0) is not None:
                arrivals.append(time.monotonic() - t0)
            assert time.monotonic() - t0 < 5.0, arrivals
        return arrivals, list(paced.transfers)
    finally:
        sender.close()
        receiver.close()


def write_profile(folder: Path, layer_ms: float) -> Path:
    """A flat estimated profile: every layer `layer_ms`, the LM head 10 ms, a draft call 3 ms, D0's
    step 5 ms, whatever the rows and KV (within the grid). Generous next to the tiny model's real
    costs (well under a millisecond), so a busy machine's scheduling hiccups stay inside the padding."""
    folder.mkdir(parents=True)
    rows = ["component,n_tokens,kv_len,dtype,latency_ms_median,latency_ms_p10,latency_ms_p90,n_samples"]
    for n in (1, 64):
        rows += [f"head,{n},0,float32,10,10,10,0", f"embed,{n},0,float32,0.01,0.01,0.01,0", f"d0_step,{n},0,float32,5,5,5,0"]
        for kv in (0, 256):
            rows += [f"layer,{n},{kv},float32,{layer_ms},{layer_ms},{layer_ms},0", f"draft,{n},{kv},float32,3,3,3,0"]
    (folder / "stage_forward.csv").write_text("\n".join(rows) + "\n")
    (folder / "meta.json").write_text(json.dumps({
        "device": "flat-test-board", "model": "tiny", "dtype": "float32", "source": "estimated",
        "method": "written by tests/runtime/test_emulation.py", "date": "2026-11-30",
        "n_layers": 5, "hidden_size": 64, "vocab_size": 97}))  # fmt: skip
    return folder


def scenario_data(tiny, profile: Path, k: float, slack_ms: float = 1.0) -> dict:
    return {"pipeline": {"n_stages": 2}, "decoding": {"max_new_tokens": 8},
            "tree": {"total": 6, "topk": 2, "depth": 3, "segment_size": 3}, "expansion": {"total": 4, "topk": 2, "depth": 2},
            "devices": {"draft": str(profile), "stage": str(profile)},
            "network": {"bandwidth_mbps": 100, "latency_ms": 1, "overhead_ms": 0},
            "emulate": {"dilation": k, "slack_ms": slack_ms}, "runtime": {"model": str(tiny.folder), "stop_at_eos": False, "timeout_s": 20}}  # fmt: skip


def emulated_run(tiny, tmp_path: Path, layer_ms: float, k: float, slack_ms: float = 1.0):
    data = scenario_data(tiny, write_profile(tmp_path / f"flat-{layer_ms}", layer_ms), k, slack_ms)
    target = Target.load(scenario_from_dict(data))
    sc = stage_scenario(target.scenario, Policy.FLOWSPEC)
    emulated = stage_scenario(target.scenario, Policy.FLOWSPEC)  # the tiny model emulates itself here
    references = [p + o for p, o in zip(tiny.prompts, tiny.outputs)]
    with Cluster(sc, target, emulated=emulated) as cluster:
        result = cluster.serve(sc, ReferenceDrafter(references, [0, 0, -1], tiny.vocab), one_after_another(tiny.prompts[:1]),
                               emulated=emulated)  # fmt: skip
    return sc, emulated, result


def test_emulated_stages_are_busy_for_k_times_their_profile(tiny, tmp_path: Path) -> None:
    """Layers of 10 ms at k = 3: V1 (2 layers) is busy 20 ms of emulated time per forward, 60 ms of
    real time; D0's LM head 10 ms; no overrun; the output is still the target's own."""
    k = 3.0
    sc, emulated, result = emulated_run(tiny, tmp_path, layer_ms=10.0, k=k)
    assert result.outputs[0] == tiny.outputs[0][:8]
    frames = result.frames()
    platform = build_platform(emulated)
    spans = frames["stage_spans"]
    stage_spans = spans[spans.stage > 0]
    assert len(stage_spans) >= 6
    for s in stage_spans.itertuples():
        expected_s = platform.stage_ms(s.stage, s.n_tokens, s.kv_len) / 1000
        assert abs((s.t_end_s - s.t_start_s) - expected_s) <= 0.05 * expected_s, s
    verify = spans[(spans.stage == 0) & (spans.kind == "verify")]
    assert ((verify.t_end_s - verify.t_start_s).round(4) == 0.010).all()
    computes = frames["computes"]
    assert (abs(computes.padded_ms - k * computes.model_ms) < 1e-9).all()
    table = metrics.overruns(computes, emulated.emulate.slack_ms)
    assert table.n_overruns.tolist() == [0, 0, 0], table
    assert set(frames["link_transfers"].kind) == {"segment", "prune"}


def test_an_emulated_batch_is_padded_once_to_the_batched_profile(tiny, tmp_path: Path) -> None:
    """ar-pp-db with two requests arriving at once: D0 sends them as one group, and every stage
    forwards the group's rows as one batch (computed one after another), busy for the profile's
    time of the batch once (flat layers: 20 ms of emulated time on V1, not 40), as the simulator
    charges it; D0 waits for the whole group and answers with the next one. Outputs are the
    target's own, no compute overran."""
    k = 3.0
    data = scenario_data(tiny, write_profile(tmp_path / "flat", 10.0), k)
    target = Target.load(scenario_from_dict(data))
    sc = stage_scenario(target.scenario, Policy.AR_PP_DB)
    references = [p + o for p, o in zip(tiny.prompts, tiny.outputs)]
    together = [dataclasses.replace(r, t_arrival_s=0.0) for r in one_after_another(tiny.prompts[:2])]
    with Cluster(sc, target, emulated=sc) as cluster:
        result = cluster.serve(sc, ReferenceDrafter(references, [0], tiny.vocab), together, emulated=sc)
    assert [result.outputs[0], result.outputs[1]] == [o[:8] for o in tiny.outputs[:2]]
    frames = result.frames()
    platform = build_platform(sc)
    spans = frames["stage_spans"]
    batches = spans[(spans.stage > 0) & (spans.request_id == -1)]  # both requests' rows in one forward
    assert (spans[spans.stage > 0].request_id == -1).all()  # every forward holds both requests
    prompt_rows = sum(map(len, tiny.prompts[:2]))
    assert sorted(zip(batches.stage, batches.kind, batches.n_tokens)) == sorted(
        [(k, "prefill", prompt_rows) for k in (1, 2)] + [(k, "tree", 2) for k in (1, 2) for _ in range(7)])
    for s in spans[spans.stage > 0].itertuples():
        expected_s = platform.stage_ms(s.stage, s.n_tokens, s.kv_len) / 1000
        assert abs((s.t_end_s - s.t_start_s) - expected_s) <= 0.05 * expected_s, s
    assert metrics.overruns(frames["computes"], sc.emulate.slack_ms).n_overruns.sum() == 0


def test_a_profile_faster_than_the_machine_overruns(tiny, tmp_path: Path) -> None:
    """Layers of 1 microsecond cannot be emulated (no slack): every stage compute overruns, and
    the run says so, while D0's 2 ms head at k = 1 keeps up."""
    _, emulated, result = emulated_run(tiny, tmp_path, layer_ms=0.001, k=1.0, slack_ms=0.0)
    assert result.outputs[0] == tiny.outputs[0][:8]  # an invalid emulation still decodes right
    table = metrics.overruns(result.frames()["computes"], emulated.emulate.slack_ms).set_index("device")
    assert (table.loc[[1, 2], "n_overruns"] == table.loc[[1, 2], "n_computes"]).all(), table
    assert (table.loc[[1, 2], "mean_real_over_padded"] > 10).all(), table


def test_validate_reports_the_distance_and_fails_beyond_the_tolerance(tiny, tmp_path: Path) -> None:
    """`flowspec validate` on an emulated tiny testbed: the runtime runs, the simulator predicts it in
    both modes, validate.csv and validate.png are written; no prediction is exact, so a zero
    tolerance fails naming the policy, while the same run passes generous tolerances (--run-dir:
    no second run). The replay's commands are the run's."""
    data = scenario_data(tiny, write_profile(tmp_path / "flat", 10.0), k=3.0)
    data["workload"] = {"n_requests": 2, "prompt_tokens": 12}
    scenario = tmp_path / "tiny-emulated.yaml"
    scenario.write_text(yaml.safe_dump(data))
    out = tmp_path / "validate"
    result = CliRunner().invoke(main, ["validate", str(scenario), "--policy", "serial", "--policy", "flowspec",
                                       "--out", str(out), "--tolerance", "0", "--tolerance-calibrated", "0",
                                       "--replicates", "2"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "serial (replay): tokens/s predicted" in result.output and "error" in result.output
    assert "commands differ" not in result.output and "raise emulate.dilation" not in result.output, result.output
    table = pd.read_csv(out / "validate.csv")
    rates = table[table.observable == "tokens_per_s"]
    assert sorted(zip(rates.policy, rates["mode"])) == [("flowspec", "calibrated"), ("flowspec", "replay"),
                                                        ("serial", "calibrated"), ("serial", "replay")]  # fmt: skip
    assert (rates.measured > 0).all() and (rates.predicted > 0).all()
    replayed = table[(table["mode"] == "replay") & (table.observable == "accepted_per_step")]
    assert (replayed.error.abs() < 1e-9).all()  # the run's own decisions: the same acceptance
    assert set(table[table.observable == "busy"].device) == {"D0", "V1", "V2"}
    assert (out / "validate.png").stat().st_size > 0 and (out / "emulated.yaml").is_file()
    again = CliRunner().invoke(main, ["validate", str(scenario), "--run-dir", str(out), "--mode", "replay",
                                      "--tolerance", "100"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "ranking by tokens/s (replay)" in again.output
    drawn = CliRunner().invoke(main, ["validate", str(scenario), "--run-dir", str(out), "--mode", "calibrated",
                                      "--replicates", "4", "--tolerance-calibrated", "100"])  # fmt: skip
    assert drawn.exit_code == 0, drawn.output
    rates = pd.read_csv(out / "validate.csv").query("observable == 'tokens_per_s'")
    assert (rates.predicted_p05 <= rates.predicted_p95).all() and (rates.predicted_p05 < rates.predicted_p95).any()
    assert table.query("mode == 'replay'").predicted_p05.isna().all()  # one replay, no band
    per_draw = pd.read_csv(out / "validate-draws.csv")  # what the ranking's ties are judged on
    assert sorted(per_draw.groupby("policy").replicate.nunique().items()) == [("flowspec", 4), ("serial", 4)]


def test_the_dilation_covers_the_slowest_computes_with_a_margin() -> None:
    """Real/model ratios 2, 3 and 10 (and an uncharged compute, ignored): the 99th percentile is
    9.86, times 1.25 is 12.3, so 13; a machine faster than every profile still gets 1."""
    computes = pd.DataFrame({"model_ms": [5.0, 1.0, 2.0, 0.0], "real_ms": [10.0, 3.0, 20.0, 0.4]})
    assert dilation_for(computes) == 13.0
    assert dilation_for(pd.DataFrame({"model_ms": [5.0], "real_ms": [1.0]})) == 1.0
    with pytest.raises(ValueError, match="no compute the cost model charges"):
        dilation_for(pd.DataFrame({"model_ms": [0.0], "real_ms": [1.0]}))


def test_the_overrun_line_names_each_device_that_overran() -> None:
    frame = to_frame([_compute(0, 10.0, 4.0), _compute(1, 20.0, 21.5), _compute(2, 20.0, 30.0), _compute(2, 20.0, 5.0)],
                     ComputeRecord)  # fmt: skip
    assert overrun_summary(frame, slack_ms=1.0) == (2, "2 overruns in 4 padded computes (V1 1/1, V2 1/2)")
    assert overrun_summary(frame, slack_ms=20.0) == (0, "0 overruns in 4 padded computes")


def _compute(device: int, padded_ms: float, real_ms: float) -> ComputeRecord:
    return ComputeRecord(run_id="r", source="runtime", request_id=0, device=device, kind="tree", t_start_s=0.0,
                         model_ms=padded_ms / 2, padded_ms=padded_ms, real_ms=real_ms)  # fmt: skip
