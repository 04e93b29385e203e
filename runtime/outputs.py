"""Runtime runs that leave files behind, as the simulator's do: frames per policy, written at once.

`run_and_save` loads the target, builds the requests, runs every policy on real processes and
writes each policy's record frames (the simulator's tables, with `source = runtime`) the moment it
finishes, so a failure later — a stage killed, a timeout — loses nothing already computed. The
first policy's text is streamed as it is generated; every later policy's tokens are compared with
it, since at T = 0 every lossless policy must produce the same output.

A policy whose run fails part-way — a stage lost, wedged or timed out, or SIGINT / SIGTERM to this
process — still leaves the requests it finished: its folder gets their frames (D0's records; the
stages' spans are lost with the pipeline), `outputs.jsonl` (every request that started: the
finished with their finish reason, the one in progress with its committed tokens and none) and
`failure.json` (the error, which requests finished). Signals are exceptions for the whole run
(`runtime.shutdown`): the stages are stopped and the temporary folder removed as after any error,
what is done is written, and the caller gets `Interrupted` back as the error, a `SystemExit` whose
code (130 for SIGINT, 143 for SIGTERM) ends the process once the caller re-raises it.

With `resume` (a `runtime.resume.FailedRun`) the requests are the failed run's and only what it
left unfinished is served; `outputs.jsonl` is stitched to cover every request, on success and on
another failure alike, so a resumed run can itself be resumed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from flowspec import metrics
from flowspec.config import Policy, Scenario, dump_scenario
from flowspec.records import RunResult
from flowspec.workload import Request
from runtime.launcher import Target, drafter_kind, make_drafter, merges_lookup, run_policies
from runtime.prompts import check_requests, requests_for
from runtime.resume import FailedRun
from runtime.shutdown import Interrupted, shielded, signals_raise

Echo = Callable[..., None]


class TextStream:
    """Prints one request's text as its tokens arrive (decoding the whole output each time keeps
    multi-byte characters and merges right)."""

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.tokens: dict[int, list[int]] = {}
        self.shown: dict[int, str] = {}
        self.current: int | None = None

    def __call__(self, request_id: int, tokens: tuple[int, ...]) -> None:
        if self.tokenizer is None:
            return
        if request_id != self.current:
            self.write(f"\n--- request {request_id} ---\n")
            self.current = request_id
        out = self.tokens.setdefault(request_id, [])
        out.extend(tokens)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        shown = self.shown.get(request_id, "")
        if text.startswith(shown):
            self.write(text[len(shown):])
            self.shown[request_id] = text


def write_requests(path: Path, requests: Sequence[Request]) -> None:
    """The run's requests as served: what a replay (`flowspec replay`) feeds the simulator."""
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps({"request_id": r.request_id, "t_arrival_s": r.t_arrival_s, "prompt": list(r.prompt),
                                "max_new_tokens": r.max_new_tokens}) + "\n")  # fmt: skip


def output_rows(requests: Sequence[Request], result: RunResult, tokenizer) -> list[dict]:
    """One row per request: its prompt and generation (ids and text), why it stopped, its speed."""
    rows = metrics.request_metrics(result.frames()["requests"]).set_index("request_id")
    out = []
    for r in requests:
        tokens = result.outputs.get(r.request_id, [])
        row = rows.loc[r.request_id] if r.request_id in rows.index else None
        out.append({
            "request_id": r.request_id,
            "prompt": None if tokenizer is None else tokenizer.decode(list(r.prompt)),
            "prompt_tokens": list(r.prompt),
            "tokens": tokens,
            "text": None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True),
            "finish_reason": None if row is None else row["finish_reason"],
            "tokens_per_s": None if row is None else float(row["e2e_tokens_per_s"]),
        })  # fmt: skip
    return out


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_outputs(path: Path, requests: Sequence[Request], result: RunResult, tokenizer) -> None:
    """`outputs.jsonl`: one line per request (`output_rows`)."""
    write_rows(path, output_rows(requests, result, tokenizer))


def write_failed(folder: Path, requests: Sequence[Request], completed: RunResult, error: BaseException, tokenizer,
                 resume: FailedRun | None = None, scenario: Scenario | None = None) -> None:  # fmt: skip
    """A failed policy's folder: frames and outputs of the requests it finished, and `failure.json`.
    A resumed run's (`resume`) outputs and ids also hold what it carried from the run it resumed."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in completed.frames().items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    started = [r for r in requests if r.request_id in completed.outputs]
    rows = output_rows(started, completed, tokenizer)
    finished = {int(i) for i in completed.frames()["requests"]["request_id"]}
    if resume is not None:
        assert scenario is not None
        rows = resume.stitched(rows, scenario, tokenizer)
        finished |= resume.completed
    write_rows(folder / "outputs.jsonl", rows)
    (folder / "failure.json").write_text(json.dumps({
        "error": str(error), "kind": type(error).__name__, "elapsed_s": completed.elapsed_s,
        "completed_request_ids": sorted(finished),
        "started_request_ids": [row["request_id"] for row in rows],
    }, indent=1) + "\n")  # fmt: skip


def overrun_summary(computes: pd.DataFrame, slack_ms: float) -> tuple[int, str]:
    """An emulated run's overrun count and its line: "N overruns in M padded computes (D0 a/b, ...)",
    naming each device that overran with its overruns / computes."""
    table = metrics.overruns(computes, slack_ms)
    n, total = int(table["n_overruns"].sum()), int(table["n_computes"].sum())
    bad = ", ".join(f"{'D0' if r.device == 0 else f'V{r.device}'} {r.n_overruns}/{r.n_computes}"
                    for r in table[table.n_overruns > 0].itertuples())  # fmt: skip
    return n, f"{n} overruns in {total} padded computes" + (f" ({bad})" if bad else "")


def overrun_note(frames: dict[str, pd.DataFrame], emulated: Scenario | None) -> str:
    """", N overruns in M padded computes" for an emulated run, loud when N > 0."""
    if emulated is None:
        return ""
    n, line = overrun_summary(frames["computes"], emulated.emulate.slack_ms)
    return f"; {line.replace('overruns', 'OVERRUNS', 1)}: the emulation is invalid" if n else f"; {line}"


def run_and_save(
    scenario: Scenario,
    policies: Sequence[Policy],
    folder: Path,
    *,
    base_dir: Path | None,
    prompt: str | None,
    prompts_file: Path | None,
    echo: Echo,
    stream: bool = True,
    resume: FailedRun | None = None,
) -> tuple[dict[str, dict[str, pd.DataFrame]], BaseException | None, dict[str, RunResult]]:
    """Frames by policy for every policy that finished, the error that stopped the rest, results.
    SIGINT and SIGTERM during the run come back as the error (`Interrupted`), after the cleanup.
    `resume`: a failed run to finish (`runtime.resume`) instead of the prompts; `policies` is its policy."""
    with signals_raise():
        return _run_and_save(scenario, policies, folder, base_dir=base_dir, prompt=prompt, prompts_file=prompts_file,
                             echo=echo, stream=stream, resume=resume)  # fmt: skip


def _run_and_save(
    scenario: Scenario,
    policies: Sequence[Policy],
    folder: Path,
    *,
    base_dir: Path | None,
    prompt: str | None,
    prompts_file: Path | None,
    echo: Echo,
    stream: bool,
    resume: FailedRun | None,
) -> tuple[dict[str, dict[str, pd.DataFrame]], BaseException | None, dict[str, RunResult]]:
    emulated = scenario if scenario.emulate.dilation else None  # as the simulator reads it: model, devices, network
    target = Target.load(scenario, base_dir=base_dir, echo=lambda m: echo(m, err=True))
    scenario = target.scenario
    if emulated is not None:  # the model's EOS decides when a request ends, in the replay too
        emulated = dataclasses.replace(emulated, decoding=scenario.decoding)
    if resume is None:
        requests: list[Request] = requests_for(scenario, target.tokenizer, prompt=prompt, prompts_file=prompts_file,
                                               base_dir=base_dir)  # fmt: skip
        served = requests
    else:  # the failed run's requests, less what it finished
        resume.check_scenario(scenario)
        requests = list(resume.requests)
        check_requests(requests, scenario, str(resume.folder / "requests.jsonl"))
        served = resume.remaining(scenario)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolved.yaml").write_text(dump_scenario(scenario))
    if emulated is not None:
        (folder / "emulated.yaml").write_text(dump_scenario(emulated))
        echo(f"emulated testbed: dilation {emulated.emulate.dilation:g}, {emulated.model.n_layers}-layer model on "
             f"{', '.join(sorted(set(emulated.stage_profiles)))} (D0 {emulated.devices.draft}); times below are emulated",
             err=True)  # fmt: skip
    write_requests(folder / "requests.jsonl", requests)
    if resume is not None:
        record = resume.record(scenario)
        (folder / "resume.json").write_text(json.dumps(record, indent=1) + "\n")
        continued = ", ".join(f"request {rid} after {n} token(s)" for rid, n in record["continued"].items())
        echo(f"resuming {resume.policy} of {resume.folder}: {len(record['carried_request_ids'])} request(s) carried over, "
             f"{len(served)} to serve{f' ({continued} committed there)' if continued else ''}", err=True)  # fmt: skip
    echo(f"{len(requests)} request(s), {scenario.decoding.max_new_tokens} new tokens at most, model "
         f"{target.model_dir.name}, drafter {drafter_kind(scenario)}{' + lookup' if merges_lookup(scenario) else ''}",
         err=True)  # fmt: skip
    streamer = TextStream(target.tokenizer, lambda s: (sys.stdout.write(s), sys.stdout.flush())) if stream else None
    first = policies[0]

    def on_tokens(policy: Policy, request_id: int, tokens: tuple[int, ...]) -> None:
        if streamer is not None and policy is first:
            streamer(request_id, tokens)

    done: dict[str, dict[str, pd.DataFrame]] = {}
    results: dict[str, RunResult] = {}
    reference: dict[int, list[int]] | None = None
    failed: dict[Policy, RunResult | None] = {}  # the policy that failed part-way: what it finished

    def keep_failed(policy: Policy, completed: RunResult | None) -> None:
        failed[policy] = completed

    try:
        for policy, result in run_policies(scenario, target, policies, served, echo=lambda m: echo(m, err=True),
                                           drafter=lambda sc: make_drafter(sc, target, base_dir=base_dir),
                                           on_tokens=on_tokens, emulated=emulated, on_failure=keep_failed):  # fmt: skip
            with shielded():  # a finished policy is written whole, or a signal would leave half its files
                frames = result.frames()
                out = folder / str(policy)
                out.mkdir(parents=True, exist_ok=True)
                for name, frame in frames.items():
                    frame.to_parquet(out / f"{name}.parquet", index=False)
                rows = output_rows(served, result, target.tokenizer)
                write_rows(out / "outputs.jsonl", rows if resume is None else resume.stitched(rows, scenario, target.tokenizer))
                done[str(policy)] = frames
                results[str(policy)] = result
            n_tokens = sum(len(v) for v in result.outputs.values())
            if streamer is not None and policy is first:
                echo("", err=False)
            same = ""
            if reference is None:
                reference = result.outputs
            elif scenario.decoding.temperature == 0:
                same = ", same tokens as " + str(first) if result.outputs == reference else ", OUTPUT DIFFERS"
            echo(f"  {policy}: {n_tokens} tokens in {result.elapsed_s:.2f} s ({n_tokens / result.elapsed_s:.1f} tok/s{same})"
                 f"{overrun_note(frames, emulated)}", err=True)  # fmt: skip
    except (Exception, Interrupted) as e:  # keep what is done; the caller reports and exits non-zero
        with shielded():
            for policy, completed in failed.items():
                if completed is not None:
                    write_failed(folder / str(policy), served, completed, e, target.tokenizer, resume, scenario)
                    n = len(completed.records.requests)
                    echo(f"  {policy}: failed after {n} completed request(s); they are in {folder / str(policy)}/ "
                         f"(outputs.jsonl, frames, failure.json)", err=True)  # fmt: skip
            if isinstance(e, Interrupted):
                echo(f"{e}: stages stopped, {len(done)} finished polic{'y' if len(done) == 1 else 'ies'} kept", err=True)
        return done, e, results
    return done, None, results
