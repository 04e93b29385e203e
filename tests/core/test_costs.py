"""flowspec/costs.py: profile validation, interpolation, cost arithmetic and the shipped profiles.

Expected numbers are worked out by hand from the tiny profile below, so a change to the
interpolation or to a cost formula shows up as a literal mismatch. No torch, no transformers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import pytest

from flowspec.costs import (
    AcceptanceProfile,
    DeviceProfile,
    DraftNodeCostModel,
    LinkCostModel,
    OutOfGridError,
    ProfileError,
    StageCostModel,
)

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
HEADER = ["component", "n_tokens", "kv_len", "dtype", "latency_ms_median", "latency_ms_p10", "latency_ms_p90", "n_samples"]

# layer: n in {1, 4} x kv in {0, 100}; embed, head: n in {1, 4}; draft: n in {1, 4}, kv only 0.
ROWS = [
    ["layer", 1, 0, "float32", 1.0, 0.9, 1.1, 5],
    ["layer", 4, 0, "float32", 4.0, 3.9, 4.1, 5],
    ["layer", 1, 100, "float32", 2.0, 1.9, 2.1, 5],
    ["layer", 4, 100, "float32", 8.0, 7.9, 8.1, 5],
    ["embed", 1, 0, "float32", 0.1, 0.1, 0.1, 5],
    ["embed", 4, 0, "float32", 0.4, 0.4, 0.4, 5],
    ["head", 1, 0, "float32", 10.0, 9.0, 11.0, 5],
    ["head", 4, 0, "float32", 20.0, 19.0, 21.0, 5],
    ["draft", 1, 0, "float32", 5.0, 5.0, 5.0, 5],
    ["draft", 4, 0, "float32", 11.0, 11.0, 11.0, 5],
]
META = {"device": "toy", "model": "toy-model", "dtype": "float32", "source": "measured",
        "method": "hand-written test fixture", "date": "2025-01-01", "torch_version": "x",
        "transformers_version": "y", "git_sha": None, "n_layers": 4, "hidden_size": 8, "vocab_size": 16}


def write_profile(folder: Path, rows=ROWS, meta=META, header=HEADER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "stage_forward.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def toy(tmp_path: Path) -> DeviceProfile:
    return DeviceProfile.load(write_profile(tmp_path / "toy"))


# --- interpolation ---------------------------------------------------------------------------

def test_grid_points_are_returned_exactly(toy):
    """Pins: a query on a grid point returns that row's median, at every corner of the grid."""
    assert toy.layer_ms(1, 0) == 1.0
    assert toy.layer_ms(4, 0) == 4.0
    assert toy.layer_ms(1, 100) == 2.0
    assert toy.layer_ms(4, 100) == 8.0
    assert toy.head_ms(4) == 20.0


def test_bilinear_interpolation_literal(toy):
    """Pins bilinear interpolation: (n=2, kv=50) = mean of 1+3/3 = 2 and 2+6/3 = 4, i.e. 3.0;
    (n=4, kv=25) = 4 + 0.25 * (8 - 4) = 5.0; (n=1, kv=50) = 1.5."""
    assert toy.layer_ms(2, 50) == pytest.approx(3.0)
    assert toy.layer_ms(4, 25) == pytest.approx(5.0)
    assert toy.layer_ms(1, 50) == pytest.approx(1.5)
    assert toy.layer_ms(3, 0) == pytest.approx(3.0)


def test_one_dimensional_components_literal(toy):
    """Pins: embed/head interpolate in n only (embed(3) = 0.3, head(2) = 10 + 10/3), and a draft
    measured only at kv_len 0 ignores kv_len (draft(2, 999) = 5 + 6/3 = 7)."""
    assert toy.embed_ms(3) == pytest.approx(0.3)
    assert toy.head_ms(2) == pytest.approx(10 + 10 / 3)
    assert toy.draft_ms(2) == pytest.approx(7.0)
    assert toy.draft_ms(2, kv_len=999) == pytest.approx(7.0)


def test_lookups_are_memoised(toy):
    """Pins: a second identical query is served from the per-grid memo, not recomputed."""
    v = toy.layer_ms(2, 50)
    assert toy.grids["layer"]._memo[(2, 50)] == v
    assert toy.layer_ms(2, 50) == v


@pytest.mark.parametrize("call, what", [
    (lambda p: p.layer_ms(5, 0), "n_tokens=5 is outside the grid [1, 4]"),
    (lambda p: p.layer_ms(0, 0), "n_tokens=0 is outside the grid [1, 4]"),
    (lambda p: p.layer_ms(1, 101), "kv_len=101 is outside the grid [0, 100]"),
    (lambda p: p.head_ms(5), "component 'head': n_tokens=5"),
    (lambda p: p.draft_ms(8, 0), "component 'draft': n_tokens=8"),
])
def test_out_of_grid_raises(toy, call, what):
    """Pins: no silent extrapolation; the error names the file, component, value and grid range."""
    with pytest.raises(OutOfGridError) as e:
        call(toy)
    assert "stage_forward.csv" in str(e.value) and what in str(e.value)
    assert isinstance(e.value, ProfileError) and isinstance(e.value, ValueError)


def test_missing_optional_component(tmp_path):
    """Pins: `draft` is optional on load, but asking for it on a stage-only profile is an error."""
    p = DeviceProfile.load(write_profile(tmp_path / "nodraft", rows=ROWS[:8]))
    with pytest.raises(ProfileError, match="component 'draft' not in this profile"):
        p.draft_ms(1)


def test_load_logs_provenance(tmp_path, caplog):
    """Pins: loading logs device, model, source and grid size on logger flowspec.sim."""
    with caplog.at_level(logging.INFO, logger="flowspec.sim"):
        DeviceProfile.load(write_profile(tmp_path / "p"))
    msg = caplog.records[-1].getMessage()
    assert caplog.records[-1].name == "flowspec.sim"
    assert "device=toy" in msg and "model=toy-model" in msg and "source=measured" in msg and "layer 2x2" in msg


# --- cost models -----------------------------------------------------------------------------

def test_stage_cost_model_literal(toy):
    """Pins forward_ms = slowdown * (n_layers * layer + embed if first); last adds nothing
    (the LM head lives on D0): 2 * (3 * 3.0 + 0.2) = 18.4, and 3 * 3.0 = 9.0."""
    assert StageCostModel(toy, 3, first=True, last=False, slowdown=2.0).forward_ms(2, 50) == pytest.approx(18.4)
    assert StageCostModel(toy, 3, first=False, last=True).forward_ms(2, 50) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        StageCostModel(toy, 0, first=True, last=True)
    with pytest.raises(ValueError, match="slowdown must be finite and > 0"):
        StageCostModel(toy, 1, first=True, last=True, slowdown=0.0)


def test_draft_node_cost_model_literal(toy):
    """Pins D0 costs: verify_ms = head(n_rows) (0 for no rows); draft_ms splits rows evenly,
    n_calls * draft(ceil(n_rows / n_calls)) = 2 * draft(3) = 2 * 9 = 18; slowdown multiplies."""
    d0 = DraftNodeCostModel(toy)
    assert d0.verify_ms(1) == 10.0
    assert d0.verify_ms(0) == 0.0
    assert d0.draft_ms(2, 5, 0) == pytest.approx(18.0)
    assert d0.draft_ms(0, 0, 0) == 0.0
    assert DraftNodeCostModel(toy, slowdown=1.5).draft_ms(1, 4, 0) == pytest.approx(16.5)


# stage_overhead: n in {1, 4} x kv in {0, 100}; d0_step: tree sizes 1, 9 (kv_len 0 only).
EXTRA = [
    ["stage_overhead", 1, 0, "float32", 0.3, 0.3, 0.3, 5],
    ["stage_overhead", 4, 0, "float32", 0.5, 0.5, 0.5, 5],
    ["stage_overhead", 1, 100, "float32", 0.4, 0.4, 0.4, 5],
    ["stage_overhead", 4, 100, "float32", 0.7, 0.7, 0.7, 5],
    ["d0_step", 1, 0, "float32", 0.2, 0.2, 0.2, 50],
    ["d0_step", 9, 0, "float32", 1.0, 0.9, 1.4, 50],
]


def test_stage_overhead_and_d0_step_literal(tmp_path, toy):
    """Pins the optional components: a stage pays stage_overhead once per forward whatever its
    layers: at (n=2, kv=50) 3 * 3.0 + 0.2 + mean(0.3 + 0.2/3, 0.4 + 0.3/3) = 9.2 + 0.4333; D0's
    step is d0_step by tree size, interpolated (size 5 = 0.2 + 0.8 * 4/8 = 0.6), size 0 asks for
    size 1, slowdown multiplies; a profile without them charges exactly as before (0 for steps)."""
    p = DeviceProfile.load(write_profile(tmp_path / "full", rows=ROWS + EXTRA))
    assert p.stage_overhead_ms(2, 50) == pytest.approx((0.3 + 0.2 / 3 + 0.4 + 0.3 / 3) / 2)
    assert StageCostModel(p, 3, first=True, last=False).forward_ms(2, 50) == pytest.approx(9.2 + (0.3 + 0.2 / 3 + 0.4 + 0.1) / 2)
    assert DraftNodeCostModel(p).step_ms(5) == pytest.approx(0.6)
    assert DraftNodeCostModel(p).step_ms(0) == pytest.approx(0.2)
    assert DraftNodeCostModel(p, slowdown=2.0).step_ms(9) == pytest.approx(2.0)
    with pytest.raises(OutOfGridError, match="component 'd0_step': n_tokens=10 is outside the grid"):
        DraftNodeCostModel(p).step_ms(10)
    assert StageCostModel(toy, 3, first=True, last=False).forward_ms(2, 50) == pytest.approx(9.2)
    assert DraftNodeCostModel(toy).step_ms(40) == 0.0 and not toy.has("d0_step")


def test_link_cost_arithmetic():
    """Pins the link formula: 1 MB at 1000 Mbps serializes in 8 ms; transfer adds latency and
    per-message overhead (8 + 2 + 0.5); 4096 B at 150 Mbps = 32768 / 150000 ms."""
    link = LinkCostModel(bandwidth_mbps=1000, latency_ms=2.0, overhead_ms=0.5)
    assert link.serialize_ms(1_000_000) == pytest.approx(8.0)
    assert link.transfer_ms(1_000_000) == pytest.approx(10.5)
    assert link.transfer_ms(0) == pytest.approx(2.5)
    assert LinkCostModel(150, 0.0).serialize_ms(4096) == pytest.approx(32768 / 150000)


@pytest.mark.parametrize("kwargs, match", [
    ({"bandwidth_mbps": 0, "latency_ms": 1}, "bandwidth_mbps must be finite and > 0, got 0"),
    ({"bandwidth_mbps": -5, "latency_ms": 1}, "bandwidth_mbps must be finite and > 0"),
    ({"bandwidth_mbps": math.nan, "latency_ms": 1}, "bandwidth_mbps must be finite and > 0"),
    ({"bandwidth_mbps": 10, "latency_ms": -1}, "latency_ms must be finite and >= 0"),
    ({"bandwidth_mbps": 10, "latency_ms": 1, "overhead_ms": -0.1}, "overhead_ms must be finite and >= 0"),
])
def test_link_validation(kwargs, match):
    """Pins: a link with non-positive bandwidth or negative delays is refused at construction."""
    with pytest.raises(ValueError, match=match):
        LinkCostModel(**kwargs)


# --- device profile validation ---------------------------------------------------------------

def _set(rows, i, col, value):
    rows = [list(r) for r in rows]
    rows[i][HEADER.index(col)] = value
    return rows


@pytest.mark.parametrize("rows, match", [
    (_set(ROWS, 6, "n_tokens", 0), "stage_forward.csv: row 7: n_tokens must be >= 1, got 0"),
    (_set(ROWS, 0, "n_tokens", "two"), "row 1: n_tokens must be an integer, got 'two'"),
    (_set(ROWS, 1, "kv_len", -1), "row 2: kv_len must be >= 0, got -1"),
    (_set(ROWS, 2, "component", "lm_head"),
     "row 3: component must be one of layer, embed, head, draft, stage_overhead, d0_step, got 'lm_head'"),
    (_set(ROWS, 4, "kv_len", 100), "row 5: kv_len must be 0 for component 'embed', got 100"),
    (_set(ROWS, 3, "latency_ms_median", 0), "row 4: latency_ms_median must be > 0"),
    (_set(ROWS, 3, "latency_ms_median", "nan"), "row 4: latency_ms_median must be finite"),
    (_set(ROWS, 3, "latency_ms_p90", "fast"), "row 4: latency_ms_p90 must be a number, got 'fast'"),
    (_set(ROWS, 0, "latency_ms_p10", 1.5), "row 1: need latency_ms_p10 <= latency_ms_median <= latency_ms_p90"),
    (_set(ROWS, 8, "n_samples", 0), "row 9: n_samples must be >= 1, got 0"),
    (_set(ROWS, 0, "dtype", ""), "row 1: dtype is empty"),
    (_set(ROWS, 0, "dtype", "float16"), "column dtype must hold one value"),
    (ROWS + [ROWS[0]], "row 11: duplicate point component 'layer' n_tokens=1 kv_len=0"),
    (ROWS[:3] + ROWS[4:], "component 'layer' has no point at kv_len=100 for n_tokens=4: the grid must be complete"),
    (ROWS[:6] + ROWS[8:], "component 'head' missing"),
])
def test_csv_validation_messages(tmp_path, rows, match):
    """Pins each CSV validation error: file name, then the row (1-based, header excluded) or column."""
    folder = write_profile(tmp_path / "bad", rows=rows)
    with pytest.raises(ProfileError) as e:
        DeviceProfile.load(folder)
    assert str(folder / "stage_forward.csv") in str(e.value)
    assert match in str(e.value)


@pytest.mark.parametrize("rows, match", [
    (ROWS + _set(EXTRA, 5, "kv_len", 5), "row 16: kv_len must be 0 for component 'd0_step', got 5"),
    (ROWS + EXTRA[:3] + EXTRA[4:], "component 'stage_overhead' has no point at kv_len=100 for n_tokens=4"),
    (ROWS + _set(EXTRA, 4, "n_tokens", 0), "row 15: n_tokens must be >= 1, got 0"),
    (ROWS + _set(EXTRA, 5, "latency_ms_p90", 0.5), "row 16: need latency_ms_p10 <= latency_ms_median <= latency_ms_p90"),
    (ROWS + EXTRA + EXTRA[4:5], "row 17: duplicate point component 'd0_step' n_tokens=1 kv_len=0"),
])
def test_new_components_validation_messages(tmp_path, rows, match):
    """Pins: malformed stage_overhead / d0_step rows are refused naming the file, then the row and
    column, or the component and the missing grid point."""
    folder = write_profile(tmp_path / "bad", rows=rows)
    with pytest.raises(ProfileError) as e:
        DeviceProfile.load(folder)
    assert str(folder / "stage_forward.csv") in str(e.value) and match in str(e.value)


def test_csv_column_messages(tmp_path):
    """Pins: the header must be exactly the schema's columns; the error names the column."""
    drop = HEADER.index("latency_ms_median")
    missing = write_profile(tmp_path / "missing", rows=[r[:drop] + r[drop + 1:] for r in ROWS],
                            header=HEADER[:drop] + HEADER[drop + 1:])
    with pytest.raises(ProfileError) as e:
        DeviceProfile.load(missing)
    assert str(e.value) == f"{missing / 'stage_forward.csv'}: column latency_ms_median missing"
    extra = write_profile(tmp_path / "extra", rows=[r + ["x"] for r in ROWS], header=HEADER + ["notes"])
    with pytest.raises(ProfileError, match=r"stage_forward.csv: unexpected column 'notes' \(columns are exactly"):
        DeviceProfile.load(extra)


@pytest.mark.parametrize("change, match", [
    ({"source": "guessed"}, "meta.json: key source must be measured or estimated, got 'guessed'"),
    ({"method": None}, "meta.json: key method missing"),
    ({"torch_version": None}, "meta.json: key torch_version missing (required when source is measured)"),
    ({"n_layers": 0}, "meta.json: key n_layers must be a positive integer, got 0"),
    ({"dtype": "float16"}, "column dtype is 'float32' but meta.json says 'float16'"),
    ({"threads": 0}, "meta.json: key threads must be a positive integer, got 0"),
])
def test_meta_validation_messages(tmp_path, change, match):
    """Pins each meta.json error: the file and the key (a None in `change` deletes the key)."""
    meta = {k: v for k, v in {**META, **change}.items() if not (k in change and change[k] is None)}
    with pytest.raises(ProfileError) as e:
        DeviceProfile.load(write_profile(tmp_path / "bad", meta=meta))
    assert match in str(e.value)


def test_estimated_profile_allows_zero_samples(tmp_path):
    """Pins: n_samples = 0 ("nothing sampled") is legal only when meta says estimated, which
    also needs no torch/transformers versions."""
    meta = {k: v for k, v in META.items() if k not in ("torch_version", "transformers_version")}
    p = DeviceProfile.load(write_profile(tmp_path / "est", rows=_set(ROWS, 0, "n_samples", 0),
                                         meta={**meta, "source": "estimated"}))
    assert p.source == "estimated"


def test_missing_files_messages(tmp_path):
    """Pins: missing folder, meta.json, CSV, and unparsable JSON each name the path."""
    with pytest.raises(ProfileError, match="nowhere: profile folder missing"):
        DeviceProfile.load(tmp_path / "nowhere")
    folder = write_profile(tmp_path / "p")
    (folder / "stage_forward.csv").unlink()
    with pytest.raises(ProfileError, match="stage_forward.csv: file missing"):
        DeviceProfile.load(folder)
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(ProfileError, match="meta.json: not valid JSON"):
        DeviceProfile.load(folder)
    (folder / "meta.json").unlink()
    with pytest.raises(ProfileError, match="meta.json: file missing"):
        DeviceProfile.load(folder)


# --- acceptance profile ----------------------------------------------------------------------

ACC = [[1, 0, 0.5], [1, 1, 0.3], [1, -1, 0.2], [2, 0, 0.6], [2, 1, 0.1], [2, -1, 0.3]]
CARD = {"source": "estimated", "method": "test", "assumes": {"top_k": 2}, "citations": []}


def write_acceptance(tmp_path: Path, rows=ACC, card=CARD, header=("depth", "rank", "probability")) -> Path:
    path = tmp_path / "acc.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    if card is not None:
        (tmp_path / "acc.json").write_text(json.dumps(card))
    return path


def test_acceptance_arrays_and_deeper_reuse(tmp_path):
    """Pins: rank_probs[d][r] is rank r's probability with "none" last; depths beyond the
    profile reuse the deepest row; depth 0 is refused."""
    a = AcceptanceProfile.load(write_acceptance(tmp_path))
    assert a.rank_probs[1].tolist() == [0.5, 0.3, 0.2]
    assert a.for_depth(2).tolist() == [0.6, 0.1, 0.3]
    assert a.for_depth(7).tolist() == [0.6, 0.1, 0.3]
    assert (a.max_depth, a.n_ranks, a.source) == (2, 2, "estimated")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        a.for_depth(0)


def test_expected_accepted_literal(tmp_path):
    """Pins the tree check by hand: full 2-ary depth-2 tree = 0.5 + 0.3 + 0.5*0.7 + 0.3*0.7 = 1.36;
    best 3 nodes = 0.5 + 0.3 + 0.3 = 1.1; chain (top_k 1) = 0.5 + 0.5*0.6 = 0.8."""
    a = AcceptanceProfile.load(write_acceptance(tmp_path))
    assert a.expected_accepted(100, 2, 2) == pytest.approx(1.36)
    assert a.expected_accepted(3, 2, 2) == pytest.approx(1.1)
    assert a.expected_accepted(10, 2, 1) == pytest.approx(0.8)


@pytest.mark.parametrize("rows, match", [
    (ACC[:5] + [[2, -1, 0.4]], "acc.csv: depth 2: probabilities sum to 1.100000000, not 1"),
    ([[3, *r[1:]] if r[0] == 2 else r for r in ACC], "acc.csv: depths must be contiguous from 1, got [1, 3]"),
    (ACC[:5] + [[2, 2, 0.3]], "acc.csv: depth 2: ranks must be -1 and 0..1 (as at depth 1), got [0, 1, 2]"),
    (ACC + [[2, -2, 0.0]], "acc.csv: row 7: rank must be >= -1, got -2"),
    (ACC + [[2, 1, 0.0]], "acc.csv: row 7: duplicate rank 1 at depth 2"),
    ([[1, 0, 1.5]] + ACC[1:], "acc.csv: row 1: probability must be <= 1, got 1.5"),
    ([[0, 0, 1.0]] + ACC, "acc.csv: row 1: depth must be >= 1, got 0"),
])
def test_acceptance_validation_messages(tmp_path, rows, match):
    """Pins each acceptance CSV error: file, then depth or row and the value."""
    with pytest.raises(ProfileError) as e:
        AcceptanceProfile.load(write_acceptance(tmp_path, rows=rows))
    assert match in str(e.value)


def test_acceptance_card_and_columns(tmp_path):
    """Pins: the JSON card must exist with a valid source and every required key; columns exact."""
    with pytest.raises(ProfileError, match=r"acc.json: file missing"):
        AcceptanceProfile.load(write_acceptance(tmp_path, card=None))
    with pytest.raises(ProfileError, match="acc.json: key source must be measured or estimated"):
        AcceptanceProfile.load(write_acceptance(tmp_path, card={**CARD, "source": "vibes"}))
    with pytest.raises(ProfileError, match="acc.json: key citations missing"):
        AcceptanceProfile.load(write_acceptance(tmp_path, card={k: v for k, v in CARD.items() if k != "citations"}))
    with pytest.raises(ProfileError, match="acc.csv: column probability missing"):
        AcceptanceProfile.load(write_acceptance(tmp_path, rows=[r[:2] for r in ACC], header=("depth", "rank")))


# --- shipped profiles ------------------------------------------------------------------------

SHIPPED = sorted(p.parent for p in PROFILES.glob("*/*/meta.json") if p.parent.parent.name != "links")  # links: tests/sim/test_links.py


def test_shipped_profiles_exist():
    """Pins: the measured CPU profile and the estimated Jetson profile ship with the repo."""
    names = {f"{p.parent.name}/{p.name}" for p in SHIPPED}
    assert {"cpu-epyc-2c/smollm2-135m", "jetson-orin-agx-64gb/llama-2-7b-fp16"} <= names


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_profile_loads_and_layer_is_monotone(folder):
    """Pins: every shipped profile validates, and the layer cost does not fall as n_tokens grows
    at fixed kv_len: strictly for estimates, within a 15 % dip for measurements (machine noise)."""
    p = DeviceProfile.load(folder)
    slack = 0.85 if p.source == "measured" else 1.0
    g = p.grids["layer"]
    for a, kv in enumerate(g.kv_axis):
        row = g.table[a]
        for i in range(1, len(row)):
            assert row[i] >= slack * row[i - 1], f"{folder}: layer kv_len={kv}: n={g.n_axis[i]} dips below n={g.n_axis[i - 1]}"
    assert {"layer", "embed", "head", "draft"} <= set(p.grids)
    assert p.layer_ms(1, 0) > 0 and p.head_ms(1) > 0 and p.draft_ms(1, p.grids["draft"].kv_axis[0]) > 0


def test_shipped_acceptance_profile_matches_its_card():
    """Pins: the EAGLE-2 estimate loads, is marked estimated, and its card's implied accepted
    length (60-node top-10 tree, depth 6) is what the profile gives: ~3.75 drafts, tau ~4.75."""
    a = AcceptanceProfile.load(PROFILES / "acceptance" / "eagle2-7b-chat-estimate.csv")
    assert a.source == "estimated" and a.n_ranks == 10
    ea = a.expected_accepted(60, 6, 10)
    assert ea == pytest.approx(a.card["check"]["expected_accepted_drafts"], abs=1e-3)
    assert 3.0 <= ea <= 4.0  # EAGLE-2's tau of 4-5 for 7B chat, minus the bonus token
