"""Request workloads: who arrives when, with which prompt and output length — in both backends.

Theory of operation
-------------------
A workload is a list of `Request`s with arrival times, built before a run starts from the
scenario's `workload` section and its seed. The simulator and the runtime build it here, from the
same YAML, so a scenario means the same arrivals in both (validation compares them run for run):

- `single`: a closed loop — request i+1 arrives the moment request i finishes (`t_arrival_s` is
  None; the backend fills it in), so there is never a queue: the sparse, one-at-a-time regime;
- `poisson`: exponential inter-arrival times at `rate_per_s`, drawn from the scenario's seed; a
  request that arrives while the pipeline is busy waits in the core's FIFO queue;
- `trace`: a CSV with `t_arrival_s, prompt_tokens, max_new_tokens`, one row per request.

Prompts differ by backend, arrivals do not: the simulator draws synthetic token ids of the
requested length (its target is synthetic too; only the length matters for cost), the runtime
tokenizes real prompts (`runtime.prompts`) and hands them to `with_prompts`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from flowspec.config import Arrivals, Scenario, ScenarioError

TRACE_COLUMNS = ("t_arrival_s", "prompt_tokens", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    t_arrival_s: float | None  # None: arrives when the previous request finishes (closed loop)
    prompt: tuple[int, ...]
    max_new_tokens: int | None  # None: the scenario's decoding.max_new_tokens


@dataclass(frozen=True, slots=True)
class Arrival:
    """When a request arrives and the lengths the workload gives it."""

    t_arrival_s: float | None
    prompt_tokens: int
    max_new_tokens: int


def arrivals(scenario: Scenario, base_dir: Path | None = None, rng: np.random.Generator | None = None) -> list[Arrival]:
    """The scenario's arrivals, reproducibly from its seed (`rng`: the workload's generator, for
    callers that go on drawing prompts from it); `base_dir` resolves a trace path."""
    wl = scenario.workload
    rng = rng if rng is not None else workload_rng(scenario)
    max_new = scenario.decoding.max_new_tokens
    if wl.arrivals is Arrivals.TRACE:
        assert wl.trace is not None
        return [Arrival(t, n_prompt, n_new) for t, n_prompt, n_new in read_trace(Path(base_dir or ".") / wl.trace)]
    if wl.arrivals is Arrivals.SINGLE:
        times: list[float | None] = [0.0] + [None] * (wl.n_requests - 1)
    else:
        times = np.cumsum(rng.exponential(1.0 / wl.rate_per_s, size=wl.n_requests)).tolist()
    return [Arrival(t, wl.prompt_tokens, max_new) for t in times]


def workload_rng(scenario: Scenario) -> np.random.Generator:
    return np.random.default_rng([scenario.seed, 0x5EED])


def build_workload(scenario: Scenario, base_dir: Path | None = None) -> list[Request]:
    """The simulator's requests: the scenario's arrivals with synthetic prompts of their lengths."""
    rng = workload_rng(scenario)
    vocab = scenario.model.vocab_size
    out = []
    for i, a in enumerate(arrivals(scenario, base_dir, rng)):
        prompt = tuple(int(t) for t in rng.integers(1, vocab, size=a.prompt_tokens))
        out.append(Request(i, a.t_arrival_s, prompt, a.max_new_tokens))
    return out


def with_prompts(
    scenario: Scenario, prompts: Sequence[tuple[tuple[int, ...], int | None]], base_dir: Path | None = None
) -> list[Request]:
    """The runtime's requests: the scenario's arrival times (and trace lengths of output), with real
    prompts. `prompts` are (token ids, max_new_tokens or None) pairs, cycled over the arrivals of a
    trace; otherwise one request per prompt, arriving as the workload says."""
    if scenario.workload.arrivals is not Arrivals.TRACE:  # one arrival per prompt; draws are sequential,
        # so the first n_requests times are the workload's own whatever the count
        scenario = replace(scenario, workload=replace(scenario.workload, n_requests=len(prompts)))
    times = arrivals(scenario, base_dir)
    out = []
    for i, a in enumerate(times):
        tokens, max_new = prompts[i % len(prompts)]
        out.append(Request(i, a.t_arrival_s, tuple(tokens), max_new or a.max_new_tokens))
    return out


def one_after_another(prompts: Sequence[Sequence[int]]) -> list[Request]:
    """Requests served back to back (the closed loop of `single`), each for the scenario's
    decoding.max_new_tokens."""
    return [Request(i, 0.0 if i == 0 else None, tuple(int(t) for t in p), None) for i, p in enumerate(prompts)]


def json_lines(path: Path, error: type[Exception]) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file of requests; a line that is not
    a JSON object raises `error` naming the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: each line must be a JSON object")
        yield where, row


def read_trace(path: Path) -> list[tuple[float, int, int]]:
    """Rows of a trace CSV, validated; errors name the file, line and column."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: workload.trace: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ScenarioError(f"{path}: workload.trace: not a CSV file ({e})") from None
    if not rows:
        raise ScenarioError(f"{path}: workload.trace: not a CSV file (empty)")
    header = [c.strip() for c in rows[0]]
    missing = [c for c in TRACE_COLUMNS if c not in header]
    if missing:
        raise ScenarioError(f"{path}: workload.trace: missing column(s) {', '.join(missing)}")
    index = [header.index(c) for c in TRACE_COLUMNS]
    out = []
    last = 0.0
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        values = []
        for (name, low), col in zip((("t_arrival_s", 0), ("prompt_tokens", 1), ("max_new_tokens", 1)), index):
            text = row[col].strip() if col < len(row) else ""
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            whole = name != "t_arrival_s"
            if not math.isfinite(value) or value < low or (whole and value != int(value)):
                raise ScenarioError(f"{path}: line {line}: {name} must be {'a whole number ' if whole else ''}"
                                    f">= {low}, got {text or 'an empty cell'}")  # fmt: skip
            values.append(value)
        t, n_prompt, n_new = values
        if t < last:
            raise ScenarioError(f"{path}: line {line}: t_arrival_s must not decrease, got {t} after {last}")
        last = t
        out.append((float(t), int(n_prompt), int(n_new)))
    if not out:
        raise ScenarioError(f"{path}: workload.trace: no requests")
    return out


def read_requests(path: Path, error: type[Exception], missing: str = "") -> list[Request]:
    """A run folder's requests.jsonl (as `runtime.outputs.write_requests` writes it); `error` names
    the file, line and field of anything else. Token ids and request ids are ints, never bools."""
    if not path.is_file():
        raise error(f"{path}: file missing{missing}")
    out = []
    for where, row in json_lines(path, error):
        rid, t, prompt, max_new = (row.get(k) for k in ("request_id", "t_arrival_s", "prompt", "max_new_tokens"))
        if type(rid) is not int or rid != len(out):
            raise error(f"{where}: request_id must be {len(out)} (requests in order), got {rid!r}")
        if t is not None and not (type(t) in (int, float) and math.isfinite(t) and t >= 0):
            raise error(f"{where}: t_arrival_s must be null or a number >= 0, got {t!r}")
        if not (isinstance(prompt, list) and prompt and all(type(x) is int and x >= 0 for x in prompt)):
            raise error(f"{where}: prompt must be a non-empty list of token ids")
        if max_new is not None and not (type(max_new) is int and max_new >= 1):
            raise error(f"{where}: max_new_tokens must be null or an integer >= 1, got {max_new!r}")
        out.append(Request(rid, None if t is None else float(t), tuple(prompt), max_new))
    if not out:
        raise error(f"{path}: no requests")
    return out
