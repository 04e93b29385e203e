"""Replaying a runtime run in the simulator: the same requests, drafts and target decisions.

Theory of operation
-------------------
A runtime run folder (`flowspec run`, `runs/<name>-runtime/`) holds the resolved scenario, the
requests as served (`requests.jsonl`) and, per policy, the traced record frames: the commands the
core issued, the drafter's proposals and the target's decisions (`flowspec.replay`). `load_run`
reads and validates all of it; a malformed folder is a `RunFolderError` naming the file and field.

`replay` runs the simulator's engine on the run's scenario and profiles with a `ReplayDrafter` and
a `ReplayTarget` in place of the synthetic pair, so every acceptance outcome is the run's own and
only timing can differ. The replaying core is traced too; `first_divergence` compares its command
sequence with the run's, which must be identical (DESIGN invariant 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, Scenario, ScenarioError, load_scenario
from flowspec.policy import device_scenario
from flowspec.records import RunResult
from flowspec.replay import ReplayDrafter, ReplayMismatch, ReplayTarget
from flowspec.workload import Request, read_requests
from sim.engine import SimEngine, SimulationError
from sim.experiment import with_policy
from flowspec.platform import PROFILES_DIR, build_platform

TRACE_FRAMES = {
    "commands": ("seq", "command", "request_id", "detail"),
    "proposals": ("call", "request_id", "node_id", "rank", "token", "logp"),
    "decisions": ("request_id", "segment_id", "node_id", "argmax"),
}


class RunFolderError(ValueError):
    """A run folder is missing a file or holds a malformed one (user input: exit 2)."""


@dataclass(frozen=True)
class RecordedRun:
    folder: Path
    scenario: Scenario
    requests: list[Request]
    frames: dict[str, dict[str, pd.DataFrame]]  # policy -> frame name -> frame

    @property
    def policies(self) -> list[Policy]:
        return [Policy(p) for p in self.frames]


def load_run(folder: Path) -> RecordedRun:
    """Read a runtime run folder, checking every file replay needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: no such run folder")
    if (folder / "resume.json").is_file():  # `flowspec run --resume`: its frames miss what it carried over
        raise RunFolderError(f"{folder / 'resume.json'}: a resumed run's frames hold only the requests it served; "
                             "replay the run it resumed, or run the scenario afresh")  # fmt: skip
    try:  # an emulated testbed's run is replayed on the testbed it emulated
        emulated = folder / "emulated.yaml"
        scenario = load_scenario(emulated if emulated.is_file() else folder / "resolved.yaml")
    except ScenarioError as e:
        raise RunFolderError(f"{e}") from None
    if scenario.decoding.temperature > 0:
        raise RunFolderError(f"{folder / 'resolved.yaml'}: decoding.temperature is {scenario.decoding.temperature}: "
                             "replay repeats greedy (T = 0) runs only")  # fmt: skip
    requests = read_requests(folder / "requests.jsonl", RunFolderError)
    frames: dict[str, dict[str, pd.DataFrame]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            Policy(sub.name)
        except ValueError:
            continue  # plots or other folders
        frames[sub.name] = {name: _read_frame(sub / f"{name}.parquet", columns) for name, columns in TRACE_FRAMES.items()}
        frames[sub.name]["requests"] = _read_frame(sub / "requests.parquet", ("n_output_tokens", "t_start_s", "t_finish_s"))
        frames[sub.name]["steps"] = _read_frame(sub / "steps.parquet", ("n_verified", "n_accepted", "outcome"))
    if not frames:
        raise RunFolderError(f"{folder}: no policy folder with traced frames (a folder named after a policy, "
                             "holding commands.parquet, proposals.parquet, decisions.parquet)")  # fmt: skip
    return RecordedRun(folder, scenario, requests, frames)


def _read_frame(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise RunFolderError(f"{path}: file missing (recorded by `flowspec run`; older runs were not traced)")
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise RunFolderError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for c in (c for c in columns if c not in frame.columns):
        raise RunFolderError(f"{path}: column {c} missing")
    return frame


def replay(run: RecordedRun, policy: Policy, *, profiles_dir: Path = PROFILES_DIR) -> RunResult:
    """The simulator on the run's scenario and profiles, fed the run's own drafts and decisions."""
    return replay_frames(with_policy(run.scenario, policy), run.requests, run.frames[str(policy)],
                         profiles_dir=profiles_dir)  # fmt: skip


def replay_frames(
    scenario: Scenario, requests: list[Request], frames: dict[str, pd.DataFrame], *, profiles_dir: Path = PROFILES_DIR
) -> RunResult:
    """`replay` from a traced run's frames in memory (`scenario` names the policy)."""
    p = frames["proposals"]
    drafter = ReplayDrafter(p["call"].to_numpy(), p["node_id"].to_numpy(), p["rank"].to_numpy(),
                            p["token"].to_numpy(), p["logp"].to_numpy())  # fmt: skip
    d = frames["decisions"]
    tree_rows = d[d["node_id"] >= 0]
    node_argmax = dict(zip(tree_rows["node_id"].astype(int).tolist(), tree_rows["argmax"].astype(int).tolist()))
    prompts = {r.request_id: r.prompt for r in requests}
    prompt_rows = d[d["node_id"] < 0]
    first_tokens = {prompts[int(r)]: int(a) for r, a in zip(prompt_rows["request_id"], prompt_rows["argmax"])}
    scenario = device_scenario(scenario)
    engine = SimEngine(
        scenario, build_platform(scenario, profiles_dir), drafter, ReplayTarget(node_argmax, first_tokens),
        requests, run_id=f"{scenario.name}/{scenario.policy}/replay", trace=True,
    )  # fmt: skip
    try:
        result = engine.run()
    except SimulationError as e:
        if isinstance(e.__cause__, ReplayMismatch):  # the cores diverged: say so, not "the simulator failed"
            raise ReplayMismatch(f"{e.__cause__} (simulated t={engine.env.now:.6f} s)") from None
        raise
    if not drafter.exhausted:
        raise ReplayMismatch(f"the replay made {drafter.n_calls} drafter calls, the recorded run more")
    return result


def first_divergence(recorded: pd.DataFrame, replayed: pd.DataFrame) -> str | None:
    """None when both command sequences are equal; else where and how they first differ."""
    a = recorded.sort_values("seq")[["command", "request_id", "detail"]].to_numpy().tolist()
    b = replayed.sort_values("seq")[["command", "request_id", "detail"]].to_numpy().tolist()
    for i, (x, y) in enumerate(zip(a, b)):
        if [str(v) for v in x] != [str(v) for v in y]:
            return f"command {i}: recorded {x[0]} {x[2]!r}, replayed {y[0]} {y[2]!r}"
    if len(a) != len(b):
        return f"recorded {len(a)} commands, replayed {len(b)}"
    return None


def summary_pair(measured: dict[str, pd.DataFrame], predicted: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Tokens/s and accepted tokens per step, measured and predicted."""
    m, p = metrics.summary(measured).iloc[0], metrics.summary(predicted).iloc[0]
    out = {}
    for key in ("tokens_per_s", "accepted_per_step"):
        out[f"{key}_measured"] = float(m[key])
        out[f"{key}_predicted"] = float(p[key])
        out[f"{key}_error"] = float(p[key] / m[key] - 1) if m[key] else np.nan
    return out
