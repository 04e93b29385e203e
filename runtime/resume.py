"""Resuming a failed run: what it finished is kept, what it was serving continues, the rest is served.

Theory of operation
-------------------
A policy whose run fails part-way leaves its folder (`runtime.outputs.write_failed`):
`failure.json` (which requests finished, which started), `outputs.jsonl` (every started request:
the finished with their finish reason, the unfinished with the tokens committed so far), and one
level up the run's `requests.jsonl` and `resolved.yaml`. `flowspec run SCENARIO --resume RUN_DIR`
reads them (`FailedRun.read`) and serves what is left with the same policy on a fresh cluster:

- a finished request is not served again: its line of `outputs.jsonl` is copied;
- an unfinished one is served with its prompt followed by its committed tokens as the prompt and
  what remains of its max_new_tokens. Committed tokens are final (the core commits only what the
  target decided), so at T = 0 the continuation is the uninterrupted run's, token for token: greedy
  decoding of the same context. At T > 0 it is a fresh sample from the same distribution;
- a request that never started is served as it was, its arrival shifted by the time that passed
  before the first request still to serve.

The scenario must be the failed run's (`check_scenario`): anything that changes a token (model,
decoding, tree, policy, devices, dtypes) is refused by dotted key; where the boards are and how
patient D0 is (`RESUMABLE_KEYS`) may change, since a board that comes back may come back elsewhere.

The new folder is a run folder whose `requests.jsonl` is the failed run's, so a resumed run that
fails again can be resumed in turn: its `outputs.jsonl` covers every request (stitched, `stitched`),
with `resumed_at` (how many tokens came from before the failure) on a continued one; its frames
hold only what it served itself, and `resume.json` says what came from where.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowspec.config import Policy, Scenario, ScenarioError, load_scenario, scenario_to_dict
from flowspec.workload import Request, json_lines, read_requests

# where the boards are and how long D0 waits for them: nothing here changes a token
RESUMABLE_KEYS = ("runtime.hosts", "runtime.base_port", "runtime.security", "runtime.keys", "runtime.timeout_s",
                  "runtime.startup_timeout_s", "runtime.torch_threads")  # fmt: skip


class ResumeError(ScenarioError):
    """A folder that cannot be resumed, or a scenario that is not the failed run's (bad input: exit 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class FailedRun:
    """What a failed policy left in its run folder."""

    folder: Path  # the run folder (`--out` of the failed run)
    policy: Policy  # the policy that failed (its subfolder holds failure.json)
    requests: tuple[Request, ...]  # the failed run's, as it served them
    rows: dict[int, dict[str, Any]]  # its outputs.jsonl by request id: every request it started
    completed: frozenset[int]  # the requests it finished

    @classmethod
    def read(cls, folder: Path) -> FailedRun:
        folder = Path(folder)
        if not folder.is_dir():
            raise ResumeError(f"{folder}: no such run folder")
        failed = sorted(p.parent for p in folder.glob("*/failure.json"))
        if not failed:
            raise ResumeError(f"{folder}: not a failed run (no <policy>/failure.json): every policy it ran finished, or "
                              "it failed before its first request started; run it again instead")  # fmt: skip
        if len(failed) > 1:
            raise ResumeError(f"{folder}: {len(failed)} policies failed ({', '.join(p.name for p in failed)}); "
                              "a run stops at its first failure, so this folder was written by more than one run")  # fmt: skip
        sub = failed[0]
        try:
            policy = Policy(sub.name)
        except ValueError:
            raise ResumeError(f"{sub}: not named after a policy") from None
        failure = _json(sub / "failure.json")
        completed = failure.get("completed_request_ids")
        if not (isinstance(completed, list) and all(type(i) is int for i in completed)):
            raise ResumeError(f"{sub / 'failure.json'}: field completed_request_ids: expected a list of request ids")
        requests = read_requests(folder / "requests.jsonl", ResumeError, " (written by `flowspec run` before it serves)")
        rows: dict[int, dict[str, Any]] = {}
        for where, row in json_lines(sub / "outputs.jsonl", ResumeError) if (sub / "outputs.jsonl").is_file() else ():
            rid, tokens = row.get("request_id"), row.get("tokens")
            if type(rid) is not int or not 0 <= rid < len(requests):
                raise ResumeError(f"{where}: field request_id: {rid!r} is not one of requests.jsonl's")
            if not (isinstance(tokens, list) and all(type(t) is int and t >= 0 for t in tokens)):
                raise ResumeError(f"{where}: field tokens: expected a list of token ids")
            rows[rid] = row
        for rid in (i for i in completed if i not in rows):
            raise ResumeError(f"{sub / 'outputs.jsonl'}: request {rid} finished (failure.json) but has no line")
        return cls(folder, policy, tuple(requests), rows, frozenset(completed))

    def out_folder(self, out: Path | None) -> Path:
        """Where the resumed run writes: `out`, or RUN_DIR-resumed beside the failed run, never over it."""
        if out is not None and out.resolve() == self.folder.resolve():
            raise ResumeError(f"--out {out}: that is the failed run's folder; the resumed run writes beside it")
        return out if out is not None else self.folder.with_name(f"{self.folder.name}-resumed")

    def check_scenario(self, scenario: Scenario) -> None:
        """Raise `ResumeError` naming every key where `scenario` (with the model's shapes, as the
        failed run wrote it) differs from the failed run's, outside `RESUMABLE_KEYS`."""
        path = self.folder / "resolved.yaml"
        try:
            theirs = _flat(scenario_to_dict(load_scenario(path)))
        except ScenarioError as e:
            raise ResumeError(f"{path}: {e}") from None
        ours = _flat(scenario_to_dict(scenario))
        differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)
                  and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)]  # fmt: skip
        if differ:
            shown = "; ".join(f"{k}: {ours.get(k)!r} here, {theirs.get(k)!r} there" for k in differ[:5])
            raise ResumeError(f"the scenario differs from the failed run's ({path}): {shown}"
                              + (f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""))  # fmt: skip

    def committed(self, request_id: int) -> list[int]:
        """The tokens request `request_id` committed before the failure (none if it never started)."""
        row = self.rows.get(request_id)
        return [] if row is None else list(row["tokens"])

    def remaining(self, scenario: Scenario) -> list[Request]:
        """The requests still to serve, with their ids: each unfinished one continued after its
        committed tokens, arrivals shifted so the first of them arrives at once."""
        out = []
        for r in (r for r in self.requests if r.request_id not in self.completed):
            done = self.committed(r.request_id)
            left = (r.max_new_tokens or scenario.decoding.max_new_tokens) - len(done)
            if left < 1:  # it had all its tokens when the run failed, before the core said so
                continue
            out.append(Request(r.request_id, r.t_arrival_s, r.prompt + tuple(done), left))
        start = min((r.t_arrival_s for r in out if r.t_arrival_s is not None), default=0.0)
        return [r if r.t_arrival_s is None else dataclasses.replace(r, t_arrival_s=r.t_arrival_s - start) for r in out]

    def carried(self, scenario: Scenario) -> list[int]:
        """Requests whose lines are copied as they are: finished before the failure, or complete."""
        serving = {r.request_id for r in self.remaining(scenario)}
        return sorted(rid for rid in self.rows if rid not in serving)

    def stitched(self, served: Sequence[dict[str, Any]], scenario: Scenario, tokenizer: Any) -> list[dict[str, Any]]:
        """Output lines of every request started so far, in request order: the failed run's lines
        of what it finished, and `served` (lines of the resumed run, whose prompts held the committed
        tokens) with those tokens moved back from the prompt to the generation."""
        out = {rid: self.rows[rid] for rid in self.carried(scenario)}
        original = {r.request_id: r for r in self.requests}
        for row in served:
            rid = row["request_id"]
            before = self.committed(rid)
            if before:
                prompt = list(original[rid].prompt)
                tokens = before + list(row["tokens"])
                decode = (lambda ids, **kw: None) if tokenizer is None else tokenizer.decode
                row = {**row, "prompt": decode(prompt), "prompt_tokens": prompt, "tokens": tokens,
                       "text": decode(tokens, skip_special_tokens=True),
                       "resumed_at": len(before)}  # fmt: skip
            out[rid] = row
        return [out[rid] for rid in sorted(out)]

    def record(self, scenario: Scenario) -> dict[str, Any]:
        """`resume.json`: where this run came from and what it took from there."""
        return {"resumed_from": str(self.folder.resolve()), "policy": str(self.policy),
                "carried_request_ids": self.carried(scenario),
                "continued": {str(rid): len(self.committed(rid)) for rid in sorted(self.rows)
                              if rid not in self.carried(scenario)}}  # fmt: skip


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ResumeError(f"{path}: expected a JSON object")
    return data


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for every leaf of nested sections (lists stay whole: they are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
