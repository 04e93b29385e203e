"""Scenario configuration: schema defaults, validation messages, overrides, round trips."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from flowspec import schema
from flowspec.config import (
    LOSSLESS_POLICIES,
    DecodingConfig,
    ModelConfig,
    Policy,
    Scenario,
    ScenarioError,
    Section,
    TreeConfig,
    apply_overrides,
    dump_scenario,
    from_dict,
    load_scenario,
    scenario_from_dict,
    scenario_to_dict,
    to_dict,
)

TINY = Path(__file__).resolve().parents[2] / "scenarios" / "tiny.yaml"
POLICIES = "ar-pp, ar-pp-db, chunk-pp, dsd, flowspec, flowspec-noexpand, pipedec, serial, single-sd, specpipe, specpipe-db"
TOP_KEYS = "acceptance, decoding, devices, dsd, emulate, expansion, model, name, network, pipedec, pipeline, policy, runtime, seed, specpipe, tree, workload"


# A schema with the field kinds that later sections (links, devices, workload) will use, so the
# generic loader is pinned now: a bool, a list of sections, a list of ints, an optional string.
@dataclass(frozen=True, slots=True, kw_only=True)
class Link(Section):
    bandwidth_mbps: float = 100.0

    def _check(self) -> None:
        if self.bandwidth_mbps <= 0:
            raise ScenarioError(f"bandwidth_mbps must be > 0, got {self.bandwidth_mbps!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rig(Section):
    shaped: bool = False
    links: tuple[Link, ...] = ()
    layers: tuple[int, ...] = ()
    label: str | None = None
    tree: TreeConfig = field(default_factory=TreeConfig)


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ScenarioError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_defaults_follow_the_reference_code():
    """Pins the defaults taken from the FlowSpec reference configuration."""
    s = Scenario()
    assert (s.name, s.policy, s.seed) == ("scenario", Policy.FLOWSPEC, 0)
    assert (s.decoding.temperature, s.decoding.max_new_tokens, s.decoding.eos_token_id) == (0.0, 128, None)
    assert s.pipeline.n_stages == 4
    assert (s.tree.total, s.tree.topk, s.tree.depth, s.tree.segment_size) == (80, 10, 6, 16)
    assert (s.expansion.total, s.expansion.topk, s.expansion.depth) == (64, 10, 6)
    assert s.pipedec.width == 16
    assert (s.model.hidden_size, s.model.vocab_size, s.model.dtype, s.model.dtype_bytes) == (576, 49152, "float32", 4)
    assert LOSSLESS_POLICIES == set(Policy)


def test_unknown_top_level_key_names_file_and_key():
    """An unknown top-level key is rejected with the source and the sorted known keys."""
    assert error(scenario_from_dict, {"polcy": "serial"}, "tiny.yaml") == (
        f"tiny.yaml: unknown key polcy (known: {TOP_KEYS})"
    )


def test_unknown_nested_key_names_dotted_path():
    """An unknown key inside a section is reported with its dotted path and the section's keys."""
    assert error(scenario_from_dict, {"tree": {"topkk": 3}}, "tiny.yaml") == (
        "tiny.yaml: unknown key tree.topkk (known: depth, segment_size, topk, total)"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tree": {"topk": 0}}, "tree.topk must be >= 1, got 0"),
        ({"decoding": {"max_new_tokens": -1}}, "decoding.max_new_tokens must be >= 1, got -1"),
        ({"decoding": {"temperature": -0.5}}, "decoding.temperature must be >= 0.0, got -0.5"),
        ({"decoding": {"eos_token_id": -1}}, "decoding.eos_token_id must be >= 0, got -1"),
        ({"pipeline": {"n_stages": 0}}, "pipeline.n_stages must be >= 1, got 0"),
        ({"seed": -3}, "seed must be >= 0, got -3"),
        ({"name": ""}, "name must not be empty"),
        ({"model": {"dtype": "int8"}}, "model.dtype must be one of bfloat16, float16, float32, got 'int8'"),
        ({"runtime": {"device": "gpu"}}, "runtime.device must be one of cpu, cuda, cuda:N, mps, auto, got 'gpu'"),
        ({"runtime": {"device": "cuda:x"}}, "runtime.device must be one of cpu, cuda, cuda:N, mps, auto, got 'cuda:x'"),
        ({"runtime": {"stage_dtypes": ["float32", "fp8", "float32", "float32"]}},
         "runtime.stage_dtypes must be one of bfloat16, float16, float32, got 'fp8'"),
        ({"runtime": {"stage_devices": ["cpu", "cuda"]}}, "runtime.stage_devices must list 4 entries (pipeline.n_stages), got 2"),
        (
            {"tree": {"total": 53, "topk": 4, "depth": 3}},
            "tree.total must be <= topk + depth * topk**2 = 52 (the beam's candidates), got 53",
        ),
    ],
)
def test_out_of_range_values(data, message):
    """Range checks run per section and come back prefixed with the file and dotted key."""
    assert error(scenario_from_dict, data, "tiny.yaml") == f"tiny.yaml: {message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tree": {"topk": "ten"}}, "tree.topk must be an integer, got 'ten'"),
        ({"tree": {"topk": True}}, "tree.topk must be an integer, got True"),
        ({"tree": {"topk": 4.0}}, "tree.topk must be an integer, got 4.0"),
        ({"decoding": {"temperature": "hot"}}, "decoding.temperature must be a finite number, got 'hot'"),
        ({"decoding": {"temperature": False}}, "decoding.temperature must be a finite number, got False"),
        ({"name": 7}, "name must be a string, got 7"),
        ({"policy": "fast"}, f"policy must be one of {POLICIES}, got 'fast'"),
        ({"tree": 5}, "tree must be a mapping, got 5"),
    ],
)
def test_wrong_types(data, message):
    """Type errors name the key and show the offending value; bool is never an int or a number."""
    assert error(scenario_from_dict, data, "tiny.yaml") == f"tiny.yaml: {message}"


def test_ints_are_accepted_as_floats_and_strings_as_policies():
    """YAML `temperature: 1` loads as the float 1.0 and `policy: serial` as Policy.SERIAL."""
    s = scenario_from_dict({"decoding": {"temperature": 1}, "policy": "serial"})
    assert type(s.decoding.temperature) is float and s.decoding.temperature == 1.0
    assert s.policy is Policy.SERIAL


def test_direct_construction_validates_with_relative_keys():
    """Sections built in Python validate too; their messages are relative to the section built."""
    assert error(TreeConfig, topk=0) == "topk must be >= 1, got 0"
    assert error(Scenario, tree={"topk": 0}) == "tree.topk must be >= 1, got 0"
    assert error(Scenario, policy="fast") == f"policy must be one of {POLICIES}, got 'fast'"
    assert Scenario(policy="chunk-pp").policy is Policy.CHUNK_PP
    assert ModelConfig(dtype="bfloat16").dtype_bytes == 2


def test_generic_loader_bool_and_lists():
    """The generic loader: bool is strict, lists become tuples, list errors carry the index."""
    tb = from_dict(Rig, {"shaped": True, "links": [{}, {"bandwidth_mbps": 50}], "layers": [3, 4]})
    assert tb == Rig(shaped=True, links=(Link(), Link(bandwidth_mbps=50.0)), layers=(3, 4))
    assert error(from_dict, Rig, {"shaped": 1}, "tb.yaml") == "tb.yaml: shaped must be true or false, got 1"
    assert error(from_dict, Rig, {"links": [{}, {"bandwidth_mbps": -1}]}, "tb.yaml") == (
        "tb.yaml: links.1.bandwidth_mbps must be > 0, got -1.0"
    )
    assert error(from_dict, Rig, {"links": [{"bw": 1}]}, "tb.yaml") == (
        "tb.yaml: unknown key links.0.bw (known: bandwidth_mbps)"
    )
    assert error(from_dict, Rig, {"layers": [3, "x"]}, "tb.yaml") == "tb.yaml: layers.1 must be an integer, got 'x'"
    assert error(from_dict, Rig, {"links": {"a": 1}}, "tb.yaml") == "tb.yaml: links must be a list, got {'a': 1}"
    assert error(from_dict, Rig, [1], "tb.yaml") == "tb.yaml: top level must be a mapping, got [1]"


def test_optional_fields_accept_none_or_the_type():
    """`X | None` takes None or a valid X, nothing else."""
    assert from_dict(Rig, {"label": None}).label is None
    assert from_dict(Rig, {"label": "lab"}).label == "lab"
    assert error(from_dict, Rig, {"label": 3}, "tb.yaml") == "tb.yaml: label must be a string, got 3"
    assert scenario_from_dict({"decoding": {"eos_token_id": None}}).decoding.eos_token_id is None


def test_overrides_parse_values_as_yaml_and_create_missing_sections():
    """`tree.topk=8` sets an int, `policy=chunk-pp` a string; the input mapping is left alone."""
    data = {"tree": {"topk": 4}}
    out = apply_overrides(data, ["tree.topk=8", "policy=chunk-pp", "decoding.temperature=0.7"])
    assert out == {"tree": {"topk": 8}, "policy": "chunk-pp", "decoding": {"temperature": 0.7}}
    assert data == {"tree": {"topk": 4}}


def test_override_errors_name_source_override_and_key():
    """Unknown keys, paths into scalars and malformed overrides are ScenarioErrors naming the key."""
    assert error(apply_overrides, {}, ["tree.topkk=3"], "tiny.yaml") == (
        "tiny.yaml: override tree.topkk=3: unknown key tree.topkk (known: depth, segment_size, topk, total)"
    )
    assert error(apply_overrides, {}, ["polcy=serial"], "tiny.yaml") == (
        f"tiny.yaml: override polcy=serial: unknown key polcy (known: {TOP_KEYS})"
    )
    assert error(apply_overrides, {}, ["tree.topk.x=1"], "tiny.yaml") == (
        "tiny.yaml: override tree.topk.x=1: unknown key tree.topk.x (tree.topk has no sub-keys)"
    )
    assert error(apply_overrides, {}, ["tree.topk"], "tiny.yaml") == (
        "tiny.yaml: override 'tree.topk' must look like key=value"
    )
    assert error(apply_overrides, {"tree": 5}, ["tree.topk=3"], "tiny.yaml") == (
        "tiny.yaml: override tree.topk=3: tree must be a mapping, got 5"
    )


def test_override_with_bad_value_fails_validation():
    """An override's value is checked by the same dataclasses as the file's values."""
    data = apply_overrides({}, ["tree.topk=ten"], "tiny.yaml")
    assert error(scenario_from_dict, data, "tiny.yaml") == "tiny.yaml: tree.topk must be an integer, got 'ten'"


def test_overrides_with_list_indices():
    """`links.0.bandwidth_mbps=50` walks into a list by index; bad indices are named."""
    data = {"links": [{"bandwidth_mbps": 100}, {}]}
    out = schema.apply_overrides(data, ["links.1.bandwidth_mbps=50", "layers=[2, 2]"], "tb.yaml", Rig)
    assert from_dict(Rig, out).links == (Link(), Link(bandwidth_mbps=50.0))
    assert error(schema.apply_overrides, data, ["links.2.bandwidth_mbps=5"], "tb.yaml", Rig) == (
        "tb.yaml: override links.2.bandwidth_mbps=5: links.2 is out of range (links has 2 entries)"
    )
    assert error(schema.apply_overrides, data, ["links.first.bandwidth_mbps=5"], "tb.yaml", Rig) == (
        "tb.yaml: override links.first.bandwidth_mbps=5: unknown key links.first (links is a list: use an index)"
    )
    assert error(schema.apply_overrides, data, ["links.0.bw=5"], "tb.yaml", Rig) == (
        "tb.yaml: override links.0.bw=5: unknown key links.0.bw (known: bandwidth_mbps)"
    )


def test_round_trip_dict_and_yaml():
    """to_dict gives plain YAML-able values and from_dict(to_dict(s)) == s, also through YAML text."""
    s = Scenario(name="rt", policy=Policy.PIPEDEC, seed=5, decoding=DecodingConfig(temperature=0.5, eos_token_id=2))
    plain = scenario_to_dict(s)
    assert type(plain["policy"]) is str and plain["policy"] == "pipedec"
    assert scenario_from_dict(plain) == s
    assert scenario_from_dict(yaml.safe_load(dump_scenario(s))) == s
    tb = Rig(shaped=True, links=(Link(bandwidth_mbps=5.0),), layers=(1, 2), label="x")
    assert to_dict(tb)["links"] == [{"bandwidth_mbps": 5.0}]
    assert from_dict(Rig, yaml.safe_load(yaml.safe_dump(to_dict(tb)))) == tb


def test_tiny_yaml_loads():
    """scenarios/tiny.yaml is the small preset: 3 stages, a 64-token model, a 24-node tree."""
    s = load_scenario(TINY)
    assert (s.name, s.policy, s.seed, s.pipeline.n_stages) == ("tiny", Policy.FLOWSPEC, 0, 3)
    assert s.decoding == DecodingConfig(temperature=0.0, max_new_tokens=48, eos_token_id=None)
    assert s.tree == TreeConfig(total=24, topk=4, depth=3, segment_size=8)
    assert (s.expansion.total, s.expansion.topk, s.expansion.depth, s.pipedec.width) == (16, 4, 3, 4)
    assert s.model == ModelConfig(n_layers=30, hidden_size=576, vocab_size=49152, dtype="float32")
    assert s.stage_layers == (10, 10, 10) and s.stage_profiles == ("cpu-epyc-2c/smollm2-135m",) * 3
    assert load_scenario(TINY, ["tree.topk=8"]).tree.topk == 8


def test_name_defaults_to_file_stem(tmp_path):
    """A scenario file without `name` is named after its file; an empty file is all defaults."""
    (tmp_path / "edge5.yaml").write_text("seed: 3\n")
    assert load_scenario(tmp_path / "edge5.yaml").name == "edge5"
    (tmp_path / "blank.yaml").write_text("# nothing\n")
    assert load_scenario(tmp_path / "blank.yaml") == Scenario(name="blank")


def test_file_errors_name_the_file(tmp_path, monkeypatch):
    """Missing file, broken YAML and a non-mapping top level are ScenarioErrors naming the file."""
    monkeypatch.chdir(tmp_path)
    assert error(load_scenario, "missing.yaml") == "missing.yaml: no such file"
    Path("broken.yaml").write_text("tree: [1, 2\n")
    assert error(load_scenario, "broken.yaml").startswith("broken.yaml: invalid YAML at line 2, column 1: ")
    Path("list.yaml").write_text("- 1\n- 2\n")
    assert error(load_scenario, "list.yaml") == "list.yaml: top level must be a mapping, got [1, 2]"
    Path("tiny.yaml").write_text("tree:\n  topk: 0\n")
    assert error(load_scenario, "tiny.yaml") == "tiny.yaml: tree.topk must be >= 1, got 0"


def test_each_stage_computes_where_the_runtime_section_says():
    s = scenario_from_dict({"pipeline": {"n_stages": 2}, "runtime": {"device": "cuda", "dtype": "bfloat16",
                                                                     "stage_devices": ["cuda:1", "cpu"]}})  # fmt: skip
    assert [s.stage_compute(r) for r in (0, 1, 2)] == [("cuda", "bfloat16"), ("cuda:1", "bfloat16"), ("cpu", "bfloat16")]
