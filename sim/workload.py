"""Request workloads: who arrives when, with which prompt and output length.

Theory of operation
-------------------
A workload is a list of `Request`s with arrival times, built before the simulation starts from the
scenario's `workload` section and its seed:

- `single`: a closed loop — request i+1 arrives the moment request i finishes (`t_arrival_s` is
  None; the engine fills it in), so there is never a queue: the sparse, one-at-a-time regime;
- `poisson`: exponential inter-arrival times at `rate_per_s`; a request that arrives while the
  pipeline is busy waits in the core's FIFO queue;
- `trace`: a CSV with `t_arrival_s, prompt_tokens, max_new_tokens`, one row per request.

Prompts are synthetic token ids (the simulator's target is synthetic too); only their length
matters for cost, and their content makes each request's acceptance pattern different.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec.config import Arrivals, Scenario, ScenarioError

TRACE_COLUMNS = ("t_arrival_s", "prompt_tokens", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    t_arrival_s: float | None  # None: arrives when the previous request finishes (closed loop)
    prompt: tuple[int, ...]
    max_new_tokens: int


def _prompt(rng: np.random.Generator, n_tokens: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(1, vocab_size, size=n_tokens))


def build_workload(scenario: Scenario, base_dir: Path | None = None) -> list[Request]:
    """The requests of `scenario`, reproducibly from its seed; `base_dir` resolves a trace path."""
    wl = scenario.workload
    rng = np.random.default_rng([scenario.seed, 0x5EED])
    vocab = scenario.model.vocab_size
    max_new = scenario.decoding.max_new_tokens
    if wl.arrivals is Arrivals.TRACE:
        assert wl.trace is not None
        rows = read_trace(Path(base_dir or ".") / wl.trace)
        return [
            Request(i, float(t), _prompt(rng, int(n_prompt), vocab), int(n_new))
            for i, (t, n_prompt, n_new) in enumerate(rows)
        ]
    if wl.arrivals is Arrivals.SINGLE:
        times: list[float | None] = [0.0] + [None] * (wl.n_requests - 1)
    else:
        times = np.cumsum(rng.exponential(1.0 / wl.rate_per_s, size=wl.n_requests)).tolist()
    return [Request(i, t, _prompt(rng, wl.prompt_tokens, vocab), max_new) for i, t in enumerate(times)]


def read_trace(path: Path) -> list[tuple[float, int, int]]:
    """Rows of a trace CSV, validated; errors name the file, row and column."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise ScenarioError(f"{path}: workload.trace: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: workload.trace: not a CSV file ({e})") from None
    missing = [c for c in TRACE_COLUMNS if c not in frame.columns]
    if missing:
        raise ScenarioError(f"{path}: workload.trace: missing column(s) {', '.join(missing)}")
    out = []
    last = 0.0
    for i, row in enumerate(frame[list(TRACE_COLUMNS)].itertuples(index=False), start=2):
        t, n_prompt, n_new = row
        for name, value, low in (("t_arrival_s", t, 0), ("prompt_tokens", n_prompt, 1), ("max_new_tokens", n_new, 1)):
            if pd.isna(value) or value < low or (name != "t_arrival_s" and value != int(value)):
                raise ScenarioError(f"{path}: line {i}: {name} must be {'a whole number ' if name != 't_arrival_s' else ''}>= {low}, got {value!r}")
        if t < last:
            raise ScenarioError(f"{path}: line {i}: t_arrival_s must not decrease, got {t} after {last}")
        last = t
        out.append((float(t), int(n_prompt), int(n_new)))
    if not out:
        raise ScenarioError(f"{path}: workload.trace: no requests")
    return out
