"""Links: link profiles (validation, pricing), per-hop networks in scenarios, exact timelines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import cli
from flowspec.config import (
    DecodingConfig,
    PipelineConfig,
    Policy,
    Scenario,
    ScenarioError,
    load_scenario,
    scenario_from_dict,
)
from flowspec.synthetic import ContextOracle, GroundTruth, HashLM, OracleDrafter
from flowspec.workload import Request
from flowspec.costs import ProfileError
from sim.engine import SimEngine
from sim.experiment import simulate
from flowspec.links import TRANSFER_COLUMNS, LinkProfile, ProfiledLink
from flowspec.platform import ConstantPlatform, ProfiledPlatform

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
TINY = Path(__file__).resolve().parents[2] / "scenarios" / "tiny.yaml"

# A hand-made link: one-way 1, 2, 3 ms at 16, 72, 104 B, so 44 B (midway) is 1.5 ms and 88 B 2.5 ms.
# Streams take 0.5, 1.5, 2.0 ms per message (16 * 8 bit / 0.256 Mbit/s = 0.5 ms, ...), so one-way
# minus stream time is 0.5, 0.5 and 1.0 ms: the propagation is their median, 0.5 ms.
ROWS = [
    # nbytes, median, p10, p90, n_echoes, throughput_mbps, n_streamed
    ("16", "1.0", "0.9", "1.2", "50", "0.256", "40"),
    ("72", "2.0", "1.9", "2.2", "50", "0.384", "40"),
    ("104", "3.0", "2.9", "3.3", "50", "0.416", "40"),
]
HOST = {"hostname": "a", "cpu_model": "Some CPU", "pyzmq_version": "27.3.0", "libzmq_version": "4.3.5"}
META = {"link": "hand", "source": "measured", "method": "by hand", "date": "2026-01-02", "transport": "tcp",
        "listener": HOST, "peer": {**HOST, "hostname": "b"}, "git_sha": None}  # fmt: skip


def write_link(folder: Path, rows=ROWS, meta=META, header=TRANSFER_COLUMNS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "transfer.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


# --- pricing ---------------------------------------------------------------------------------


def test_hand_profile_prices_by_interpolation_and_split(tmp_path):
    """Pins the pricing model (profiles/README.md): one-way time interpolated in nbytes, flat below
    the grid, extended at the largest size's throughput above it; propagation 0.5 ms; the link
    holds each message for one-way - propagation."""
    profile = LinkProfile.load(write_link(tmp_path / "hand"))
    assert [profile.one_way_ms_at(n) for n in (1, 16, 44, 72, 88, 104)] == pytest.approx([1.0, 1.0, 1.5, 2.0, 2.5, 3.0])
    # 52 B beyond 104 B at 0.416 Mbit/s = 416 bit/ms: 52 * 8 / 416 = 1 ms more
    assert profile.one_way_ms_at(156) == pytest.approx(4.0)
    link = ProfiledLink(profile)
    assert link.latency_ms == pytest.approx(0.5)
    assert [link.send_ms(n) for n in (16, 44, 88, 156)] == pytest.approx([0.5, 1.0, 2.0, 3.5])
    # streams, model vs measured: 0.5 vs 0.5 ms at 16 B, 1.5 vs 1.5 at 72 B, 2.5 vs 2.0 at 104 B
    assert link.stream_error() == pytest.approx(0.25)


def test_propagation_stays_between_zero_and_the_least_one_way_time(tmp_path):
    """A stream slower than an isolated message gives a negative estimate: the propagation is
    then 0 and the link holds the whole one-way time. A median above the least one-way time is
    cut to it, so no size's link time is negative."""
    slow = [("72", "2.0", "1.9", "2.2", "50", "0.1", "40")]  # 72 B stream at 5.76 ms per message
    link = ProfiledLink(LinkProfile.load(write_link(tmp_path / "a", rows=slow)))
    assert link.latency_ms == 0.0 and link.send_ms(72) == pytest.approx(2.0)
    rows = [("16", "0.2", "0.2", "0.2", "50", "1000", "40"), ROWS[1], ROWS[2]]  # estimates 0.2, 0.5, 1.0
    link = ProfiledLink(LinkProfile.load(write_link(tmp_path / "b", rows=rows)))
    assert link.latency_ms == pytest.approx(0.2) and link.send_ms(16) == pytest.approx(0.0)


def test_shipped_loopback_profile_loads_and_delivers_at_its_one_way_times():
    """Pins: the shipped loopback profile validates, says in its card that it was measured on
    loopback by the command, and every measured size is delivered at its measured median."""
    profile = LinkProfile.load(PROFILES / "links" / "loopback-tcp")
    assert profile.source == "measured" and profile.meta["transport"] == "tcp"
    assert "127.0.0.1" in profile.meta["address"] and "loopback" in profile.meta["notes"].lower()
    assert "flowspec profile link --peer" in profile.meta["method"] and "--listen" in profile.meta["method"]
    link = ProfiledLink(profile)
    assert 0 <= link.latency_ms <= profile.one_way_ms.min()
    for n, w in zip(profile.nbytes, profile.one_way_ms):
        assert link.send_ms(int(n)) + link.latency_ms == pytest.approx(w)
    top = int(profile.nbytes[-1])
    assert link.send_ms(2 * top) > link.send_ms(top)  # beyond the grid: more bytes, more time


# --- malformed link profiles -----------------------------------------------------------------

BAD_PROFILES = {
    "missing column": ({"header": TRANSFER_COLUMNS[:-1], "rows": [r[:-1] for r in ROWS]},
                       r"transfer.csv: column n_streamed missing"),
    "extra column": ({"header": (*TRANSFER_COLUMNS, "jitter"), "rows": [(*r, "1") for r in ROWS]},
                     r"transfer.csv: unexpected column 'jitter'"),
    "non-numeric cell": ({"rows": [ROWS[0], ("72", "fast", "1.9", "2.2", "50", "0.576", "40"), ROWS[2]]},
                         r"transfer.csv: row 2: one_way_ms_median must be a number, got 'fast'"),
    "fractional size": ({"rows": [("16.5", *ROWS[0][1:])]}, r"transfer.csv: row 1: nbytes must be an integer, got '16.5'"),
    "sizes not increasing": ({"rows": [ROWS[0], ROWS[2], ROWS[1]]},
                             r"transfer.csv: row 3: nbytes must increase from row to row, got 72 after 104"),
    "repeated size": ({"rows": [ROWS[0], ROWS[0]]}, r"transfer.csv: row 2: nbytes must increase from row to row, got 16 after 16"),
    "p10 above median": ({"rows": [("16", "1.0", "1.1", "1.2", "50", "0.256", "40")]},
                         r"transfer.csv: row 1: need one_way_ms_p10 <= one_way_ms_median <= one_way_ms_p90"),
    "zero throughput": ({"rows": [("16", "1.0", "0.9", "1.2", "50", "0", "40")]},
                        r"transfer.csv: row 1: throughput_mbps must be > 0, got 0.0"),
    "measured without echoes": ({"rows": [("16", "1.0", "0.9", "1.2", "0", "0.256", "40")]},
                                r"transfer.csv: row 1: n_echoes must be >= 1, got 0"),
    "no rows": ({"rows": []}, r"transfer.csv: no rows"),
    "meta key missing": ({"meta": {k: v for k, v in META.items() if k != "method"}}, r"meta.json: key method missing"),
    "meta bad source": ({"meta": {**META, "source": "vibes"}}, r"meta.json: key source must be measured or estimated"),
    "meta bad date": ({"meta": {**META, "date": "last tuesday"}}, r"meta.json: key date must be an ISO date or time, got 'last tuesday'"),
    "meta host field missing": ({"meta": {**META, "listener": {k: v for k, v in HOST.items() if k != "cpu_model"}}},
                                r"meta.json: key listener.cpu_model must be a non-empty string, got None"),
    "meta host not an object": ({"meta": {**META, "peer": "b"}}, r"meta.json: key peer must be an object"),
    "meta missing": ({"meta": None}, r"meta.json: file missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_PROFILES)
def test_malformed_link_profile_is_rejected_naming_file_and_field(tmp_path, case):
    """Each defect is a ProfileError at load that names the file and the row, column or key."""
    kwargs, message = BAD_PROFILES[case]
    with pytest.raises(ProfileError, match=message):
        LinkProfile.load(write_link(tmp_path / "bad", **kwargs))


def test_estimated_profile_needs_no_hosts_or_samples(tmp_path):
    """A link profile from a datasheet (source: estimated) has no hosts and no samples."""
    meta = {k: v for k, v in META.items() if k not in ("listener", "peer")} | {"source": "estimated"}
    rows = [(r[0], *r[1:4], "0", r[5], "0") for r in ROWS]
    assert LinkProfile.load(write_link(tmp_path / "est", rows=rows, meta=meta)).source == "estimated"


def test_missing_link_profile_folder_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match=r"nope: link profile folder missing"):
        LinkProfile.load(tmp_path / "nope")
    tiny = load_scenario(TINY, ["network.links=[{}, {profile: links/nope}, {}, {}]"])
    with pytest.raises(ProfileError, match=r"profiles/links/nope: link profile folder missing"):
        ProfiledPlatform(tiny)


# --- network.links in scenarios ----------------------------------------------------------------

BAD_NETWORKS = {
    "too few links": ({"links": [{}, {}]}, "network.links must list 3 links (D0, then each stage), got 2"),
    "bad bandwidth": ({"links": [{}, {"bandwidth_mbps": 0}, {}]}, "network.links.1.bandwidth_mbps must be > 0, got 0.0"),
    "negative latency": ({"links": [{}, {}, {"latency_ms": -1}]}, "network.links.2.latency_ms must be >= 0.0, got -1.0"),
    "text bandwidth": ({"links": [{"bandwidth_mbps": "fast"}, {}, {}]}, "network.links.0.bandwidth_mbps must be a finite number, got 'fast'"),
    "profile and numbers": ({"links": [{}, {"profile": "links/x", "latency_ms": 1}, {}]},
                            "network.links.1.latency_ms cannot be set with profile"),
    "empty profile": ({"links": [{"profile": ""}, {}, {}]}, "network.links.0.profile must not be empty"),
    "unknown key": ({"links": [{}, {"rtt_ms": 1}, {}]},
                    "unknown key network.links.1.rtt_ms (known: bandwidth_mbps, latency_ms, overhead_ms, profile)"),
    "entry not a mapping": ({"links": [{}, 100, {}]}, "network.links.1 must be a mapping, got 100"),
    "not a list": ({"links": {"bandwidth_mbps": 1}}, "network.links must be a list"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_NETWORKS)
def test_malformed_network_links_are_rejected_with_the_dotted_key(case):
    network, message = BAD_NETWORKS[case]
    data = {"pipeline": {"n_stages": 2}, "model": {"n_layers": 4}, "network": network}
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(data, "x.yaml")
    assert str(info.value).startswith(f"x.yaml: {message}")


def test_links_resolve_against_the_top_level_network_and_check_prints_them(tmp_path):
    """An entry's left-out numbers are the top-level ones (`{}` is the top-level link); overrides
    reach both; `flowspec check` prints every entry resolved, and that YAML loads back the same."""
    path = tmp_path / "hops.yaml"
    path.write_text("pipeline: {n_stages: 2}\nmodel: {n_layers: 4}\n"
                    "network:\n  bandwidth_mbps: 100\n  links: [{}, {latency_ms: 5}, {profile: links/loopback-tcp}]\n")
    s = load_scenario(path, ["network.latency_ms=2", "network.links.0.overhead_ms=1"])
    links = s.network.links
    assert (links[0].bandwidth_mbps, links[0].latency_ms, links[0].overhead_ms) == (100.0, 2.0, 1.0)
    assert (links[1].bandwidth_mbps, links[1].latency_ms, links[1].overhead_ms) == (100.0, 5.0, 0.05)
    assert links[2].profile == "links/loopback-tcp" and links[2].bandwidth_mbps is None
    assert Scenario().network.link(3).bandwidth_mbps == 1000.0  # no list: every device the same link
    result = CliRunner().invoke(cli.main, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert "  - bandwidth_mbps: 100.0\n    latency_ms: 5.0\n    overhead_ms: 0.05\n    profile: null\n" in result.stdout
    assert load_scenario(path) == scenario_from_dict(yaml.safe_load(result.stdout))


class HopLinks:
    """Constant compute (a ConstantPlatform) with the links a ProfiledPlatform builds from the scenario."""

    def __init__(self, compute: ConstantPlatform, links: ProfiledPlatform) -> None:
        self.compute, self.links = compute, links

    def __getattr__(self, name: str):
        return getattr(self.compute, name)

    def send_ms(self, src: int, nbytes: int) -> float:
        return self.links.send_ms(src, nbytes)

    def latency_ms(self, src: int, dst: int) -> float:
        return self.links.latency_ms(src, dst)


def test_per_hop_network_exact_timeline(tmp_path):
    """ar-pp on 2 stages, 10 ms per forward, 1 ms of LM head, three tokens; each device its own link.

    Messages (hidden_size 8, fp32): D0 -> V1 32 B (prompt of 2) then 16 B; V1 -> V2 and V2 -> D0
    88 B then 44 B; prunes 20 B. Network 0.704 Mbit/s (88 B/ms), latency 1 ms, overhead 0, and
    links: D0 {bandwidth 0.064 (8 B/ms), overhead 0.5}: holds n B for 0.5 + n/8 ms, flies 1 ms;
    V1 the hand profile (holds 88 B 2.0 ms, 44 B 1.0 ms, flies 0.5 ms);
    V2 {latency 3}: holds 88 B 1 ms, 44 B 0.5 ms, flies 3 ms.

    Prefill: D0 link 0–4.5, V1 gets it at 5.5, runs 5.5–15.5; link 15.5–17.5, V2 gets it at 18,
    runs 18–28; link 28–29, D0 gets it at 32, head 32–33 (token 1). Token 2: D0 link 33–35.5, V1
    36.5–46.5, link 46.5–47.5, V2 48–58, link 58–58.5, D0 head 61.5–62.5. Token 3: D0's link
    carries prune to V1 62.5–65.5 (arrives 66.5), prune to V2 65.5–68.5 (69.5), then the segment
    68.5–71 (72): V1 72–82, link 82–83, V2 83.5–93.5, link 93.5–94, D0 head 97–98; exit prunes on
    D0's link 98–101 (102) and 101–104 (105).
    """
    write_link(tmp_path / "hop")
    scenario = Scenario(
        policy=Policy.AR_PP, pipeline=PipelineConfig(n_stages=2), decoding=DecodingConfig(max_new_tokens=3),
        model={"n_layers": 4, "hidden_size": 8, "vocab_size": 50},
        network={"bandwidth_mbps": 0.704, "latency_ms": 1, "overhead_ms": 0,
                 "links": [{"bandwidth_mbps": 0.064, "overhead_ms": 0.5}, {"profile": str(tmp_path / "hop")},
                           {"latency_ms": 3}]},
    )  # fmt: skip
    platform = HopLinks(ConstantPlatform(stage_ms_each=10, verify_ms_each=1), ProfiledPlatform(scenario))
    truth = GroundTruth(HashLM(50, 1))
    drafter = OracleDrafter(truth, hit_rate=0.5, rank_weights=(1,), seed=0)
    result = SimEngine(scenario, platform, drafter, ContextOracle(truth), [Request(0, 0.0, (3, 4), 3)]).run()
    f = result.frames()
    spans = f["stage_spans"].sort_values(["t_start_s", "stage"], kind="stable")
    assert [(int(r.stage), round(r.t_start_s * 1000, 6), round(r.t_end_s * 1000, 6)) for r in spans.itertuples()] == [
        (1, 5.5, 15.5), (2, 18.0, 28.0), (0, 32.0, 33.0),
        (1, 36.5, 46.5), (2, 48.0, 58.0), (0, 61.5, 62.5),
        (1, 72.0, 82.0), (2, 83.5, 93.5), (0, 97.0, 98.0),
    ]  # fmt: skip
    transfers = f["link_transfers"].sort_values(["t_send_s", "src", "dst"], kind="stable")
    assert [(int(r.src), int(r.dst), r.kind, int(r.nbytes), round(r.t_send_s * 1000, 6), round(r.t_recv_s * 1000, 6))
            for r in transfers.itertuples()] == [
        (0, 1, "segment", 32, 0.0, 5.5), (1, 2, "segment", 88, 15.5, 18.0), (2, 0, "segment", 88, 28.0, 32.0),
        (0, 1, "segment", 16, 33.0, 36.5), (1, 2, "segment", 44, 46.5, 48.0), (2, 0, "segment", 44, 58.0, 61.5),
        (0, 1, "prune", 20, 62.5, 66.5), (0, 2, "prune", 20, 65.5, 69.5), (0, 1, "segment", 16, 68.5, 72.0),
        (1, 2, "segment", 44, 82.0, 83.5), (2, 0, "segment", 44, 93.5, 97.0),
        (0, 1, "prune", 20, 98.0, 102.0), (0, 2, "prune", 20, 101.0, 105.0),
    ]  # fmt: skip


def test_single_sd_runs_with_a_per_hop_network():
    """single-sd runs its one stage beside D0: a per-hop list for the whole pipeline (with the
    shipped loopback profile in it) must not stop it, and messages stay free."""
    links = "network.links=[{profile: links/loopback-tcp}, {bandwidth_mbps: 10}, {}, {latency_ms: 9}]"
    scenario = load_scenario(TINY, [links, "policy=single-sd", "decoding.max_new_tokens=4"])
    result = simulate(scenario)
    transfers = result.frames()["link_transfers"]
    assert len(result.outputs[0]) == 4
    assert (transfers.t_recv_s == transfers.t_send_s).all()


def test_loopback_profile_in_a_pipeline_scenario():
    """The shipped loopback profile drives every hop of a simulated pipeline; each message is
    delivered at the profile's one-way time for its size (nothing queues on an idle link here)."""
    hop = "{profile: links/loopback-tcp}"
    scenario = load_scenario(TINY, [f"network.links=[{hop}, {hop}, {hop}, {hop}]", "policy=ar-pp",
                                    "decoding.max_new_tokens=3"])  # fmt: skip
    transfers = simulate(scenario).frames()["link_transfers"]
    profile = LinkProfile.load(PROFILES / "links" / "loopback-tcp")
    segments = transfers[transfers.kind == "segment"]
    for r in segments.itertuples():
        assert (r.t_recv_s - r.t_send_s) * 1000 == pytest.approx(profile.one_way_ms_at(r.nbytes))
