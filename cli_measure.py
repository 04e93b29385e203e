"""The `flowspec` commands of the validation loop: profile a device or a link, replay a run in the
simulator, calibrate acceptance from runs, validate the simulator against the runtime (DESIGN §8); and
`hetedge`, the multi-user family member simulated on its own scenario. Same rules as `cli`: thin click layers over
plain functions, bad input is `error: ...` and exit 2.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from cli import _runtime_failures, chosen_policies, main, policy_option, reports_scenario_errors, say, scenario_arguments

# --dilation auto times this machine's computes against the profiles at this dilation: padded, so
# five processes contend less than at 1, whose inflated ratios would oversize the dilation.
PROBE_DILATION = 8.0


@main.command()
@scenario_arguments
@policy_option
@click.option("--mode", type=click.Choice(["both", "replay", "calibrated"]), default="both", show_default=True,
              help="replay: the run's own drafts and decisions (timing error alone); calibrated: the scenario's "
                   "acceptance profile (timing and acceptance error together).")  # fmt: skip
@click.option("--dilation", metavar="K|auto",
              help="Emulate the scenario's testbed at dilation K (emulate.dilation); auto: size K from a short run.")
@click.option("--prompt", help="One prompt for the runtime run.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL prompts for the runtime run (as `flowspec run`).")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Validate this existing run folder instead of running the runtime.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=0.10, show_default=True,
              help="Largest tokens/s error allowed in replay mode.")
@click.option("--tolerance-calibrated", type=click.FloatRange(min=0), default=0.15, show_default=True,
              help="Largest tokens/s error allowed in calibrated mode.")
@click.option("--replicates", type=click.IntRange(min=1), default=16, show_default=True,
              help="Calibrated mode: draws of the run per policy; the prediction is their mean, with its 5-95% band.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [runs/<name>-validate].")
@reports_scenario_errors
def validate(scenario: Path, overrides: tuple[str, ...], policies: tuple[str, ...], mode: str, dilation: str | None,
             prompt: str | None, prompts_file: Path | None, run_dir: Path | None, tolerance: float,
             tolerance_calibrated: float, replicates: int, out: Path | None) -> None:  # fmt: skip
    """Run SCENARIO for real, predict the run with the simulator, and report the distance.

    The runtime runs (on loopback, an emulated testbed with emulate.dilation > 0, or real boards),
    then the simulator predicts each policy on the same requests in replay mode and in calibrated
    mode. Per policy it reports tokens/s, step time and accepted tokens per step, each device's busy
    share and idle causes: measured, predicted, error. Writes validate.csv and validate.png into the
    run folder. Exits 1 when a tokens/s error exceeds its tolerance, an emulated compute overran its
    padding, or a replay's commands differ from the run's.
    """
    import numpy as np

    import report
    from flowspec.config import load_scenario
    from sim import validation
    from sim.replay import load_run

    chosen = chosen_policies(policies, load_scenario(scenario, overrides).policy)
    sc = load_scenario(scenario, [*overrides, *_dilation_override(scenario, overrides, dilation, chosen, prompt,
                                                                   prompts_file)])  # fmt: skip
    from report.folder import claimed

    held = ExitStack()  # a run folder this command writes is claimed; one given with --run-dir is only read
    folder = run_dir or held.enter_context(claimed(out or Path("runs") / f"{sc.name}-validate", chosen=out is not None,
                                                   echo=lambda m: click.echo(m, err=True)))  # fmt: skip
    with held:
        problems: list[str] = []
        if run_dir is None:
            from runtime.outputs import run_and_save

            done, error, _ = run_and_save(sc, chosen, folder, base_dir=scenario.parent, prompt=prompt,
                                          prompts_file=prompts_file, echo=click.echo, stream=False)  # fmt: skip
            if error is not None:
                if not isinstance(error, _runtime_failures()):
                    raise error
                problems.append(f"the runtime stopped: {error}")
        run = load_run(folder)
        chosen = [p for p in run.policies if not policies or "all" in policies or str(p) in policies]
        modes = validation.MODES if mode == "both" else (mode,)
        click.echo(f"predicting {len(chosen)} polic{'y' if len(chosen) == 1 else 'ies'} with the simulator ({', '.join(modes)})",
                   err=True)  # fmt: skip
        table, same, draws = validation.compare(run, chosen, modes, replicates=replicates,
                                                echo=lambda m: click.echo(m, err=True))  # fmt: skip
        table.to_csv(folder / "validate.csv", index=False)
        draws.to_csv(folder / "validate-draws.csv", index=False)
        heads = validation.headline(table)
        report.plot_validation(heads, folder / "validate.png", tolerance)
        click.echo(report.format_table(heads))
        shares = table[(table.observable == "busy")].pivot_table(index=["policy", "mode"], columns="device",
                                                                  values="error", sort=False)  # fmt: skip
        click.echo("\nbusy share per device, predicted - measured\n" + report.format_table(shares.reset_index()))
        limits = {"replay": tolerance, "calibrated": tolerance_calibrated}
        for r in table[table.observable == "tokens_per_s"].itertuples():
            if not abs(r.error) <= limits[r.mode]:
                band = "" if np.isnan(r.predicted_p05) else \
                    f" (draws {r.predicted_p05:.3g}-{r.predicted_p95:.3g}: the run is {'in' if r.predicted_p05 <= r.measured <= r.predicted_p95 else 'outside'} their 90% band)"  # fmt: skip
                problems.append(f"{r.policy} ({r.mode}): tokens/s predicted {r.predicted:.3g}, measured {r.measured:.3g}, "
                                f"error {r.error:+.1%} (tolerance {limits[r.mode]:.0%}){band}")  # fmt: skip
        problems += [f"{p} (replay): the simulator's commands differ from the run's" for p, ok in same.items() if not ok]
        problems += _overruns(run, chosen)
        for m in (m for m in modes if (table["mode"] == m).any()):  # a batching policy alone has no replay
            click.echo(_ranking_line(table, draws, m))
        click.echo(f"\nwrote {folder}/validate.csv, validate-draws.csv, validate.png")
        if problems:
            click.echo("validation failed:\n  " + "\n  ".join(problems), err=True)
            raise SystemExit(1)


def _ranking_line(table, draws, mode: str) -> str:
    """Whether the policies rank alike by tokens/s in the run and in `mode`'s prediction; pairs the
    draws cannot order (`sim.validation.inversions`) are ties, named with their ratios."""
    from sim import validation

    measured, predicted = validation.ranking(table, mode)
    pairs = validation.inversions(table, draws, mode)
    n_draws = int(draws[draws["mode"] == mode].replicate.nunique())

    def named(rows) -> str:
        return ", ".join(f"{r.faster} > {r.slower} in the run ({r.measured_ratio:.3f}x, predicted "
                         f"{r.predicted_ratio:.3f}x, {round(r.draws_agree * n_draws)}/{n_draws} draws agree)"
                         for r in rows.itertuples())  # fmt: skip

    verdict = "same" if measured == predicted else \
        "DIFFERENT" if pairs.decided.any() else "same up to pairs too close to order"  # fmt: skip
    line = f"ranking by tokens/s ({mode}): {verdict}: measured {' > '.join(measured)}; predicted {' > '.join(predicted)}"
    if pairs.decided.any():
        line += f"\n  inverted: {named(pairs[pairs.decided])}"
    if (~pairs.decided).any():
        line += f"\n  too close to order: {named(pairs[~pairs.decided])}"
    return line


def _dilation_override(scenario: Path, overrides: tuple[str, ...], dilation: str | None, policies: list,
                       prompt: str | None, prompts_file: Path | None) -> list[str]:  # fmt: skip
    """`--dilation K` as an override; `auto`: K sized by `runtime.emulation.dilation_for` from a short
    emulated run of every policy (one request, 8 tokens): each policy's largest computes differ
    (serial verifies a whole tree on D0 at once, ar-pp one row)."""
    if dilation is None:
        return []
    if dilation != "auto":
        try:
            return [f"emulate.dilation={float(dilation)}"]
        except ValueError:
            raise click.BadParameter(f"must be a number or auto, got {dilation!r}", param_hint="--dilation") from None
    import tempfile

    import pandas as pd

    from flowspec.config import load_scenario
    from runtime.emulation import dilation_for
    from runtime.outputs import run_and_save

    probe = load_scenario(scenario, [*overrides, f"emulate.dilation={PROBE_DILATION}", "workload.n_requests=1",
                                     "decoding.max_new_tokens=8"])  # fmt: skip
    click.echo(f"--dilation auto: a short emulated run at dilation {PROBE_DILATION:g} to time this machine against "
               "the profiles", err=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="flowspec-dilation-") as tmp:
        done, error, _ = run_and_save(probe, policies, Path(tmp), base_dir=scenario.parent, prompt=prompt,
                                      prompts_file=prompts_file, echo=lambda *_a, **_k: None, stream=False)  # fmt: skip
        if error is not None:
            raise error
        k = dilation_for(pd.concat([frames["computes"] for frames in done.values()], ignore_index=True))
    click.echo(f"--dilation auto: {k:g}", err=True)
    return [f"emulate.dilation={k}"]


def _overruns(run, policies) -> list[str]:
    """One line per policy whose emulated computes overran their padding."""
    from runtime.outputs import overrun_summary
    from sim.validation import run_frames

    out = []
    for policy in policies:
        frames = run_frames(run, policy)
        if "computes" not in frames:
            continue
        n, line = overrun_summary(frames["computes"], run.scenario.emulate.slack_ms)
        if n:
            out.append(f"{policy}: {line}: raise emulate.dilation")
    return out


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@policy_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="CSV [RUN_DIR/replay.csv].")
@reports_scenario_errors
def replay(run_dir: Path, policies: tuple[str, ...], out: Path | None) -> None:
    """Replay a runtime run in the simulator: its requests, drafts and target decisions.

    Only timing can differ, so the simulator's core must issue exactly the runtime's commands (it
    is checked) and the table shows the simulator's timing error alone: tokens/s and accepted
    tokens per step, measured and predicted, per policy. Exits 1 if a command sequence differs.
    """
    import report
    from flowspec.replay import ReplayMismatch
    from sim.replay import first_divergence, load_run, replay as replay_run, summary_pair

    run = load_run(run_dir)
    chosen = [p for p in (chosen_policies(policies, run.scenario.policy) if policies else run.policies)]
    rows, diverged = [], []
    for policy in chosen:
        if str(policy) not in run.frames:
            raise click.BadParameter(f"{run_dir} has no {policy} run (it has: {', '.join(run.frames)})",
                                     param_hint="--policy")  # fmt: skip
        measured = run.frames[str(policy)]
        try:
            predicted = replay_run(run, policy).frames()
            divergence = first_divergence(measured["commands"], predicted["commands"])
        except ReplayMismatch as e:  # the replay asked for a draft or decision the run never made
            predicted, divergence = {}, str(e)
        if divergence:
            diverged.append(f"{policy}: {divergence}")
        rows.append({"policy": str(policy), **summary_pair(measured, predicted), "same_commands": divergence is None})
    import pandas as pd

    frame = pd.DataFrame(rows)
    out = out or run_dir / "replay.csv"
    frame.to_csv(out, index=False)
    click.echo(report.format_table(frame))
    click.echo(f"\nwrote {out}")
    if diverged:
        click.echo("error: the simulator's core diverged from the run's:\n  " + "\n  ".join(diverged), err=True)
        raise SystemExit(1)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Profile to write, e.g. profiles/acceptance/NAME (writes NAME.csv and NAME.json).")
@click.option("--min-sets", type=click.IntRange(min=1), default=30, show_default=True,
              help="Candidate sets a depth needs to get its own row.")
@click.option("--notes", default="", help="What the runs were (prompts, machine), for the card.")
@reports_scenario_errors
def calibrate(run_dirs: tuple[Path, ...], out: Path, min_sets: int, notes: str) -> None:
    """An acceptance profile for the simulator from the node outcomes of runtime runs.

    Per tree depth and drafter rank: the probability that the target's token is that child, from
    every policy folder in RUN_DIRS (folders written by `flowspec run`), with the candidate sets
    behind each cell in the card.
    """
    import report
    from sim.calibrate import calibrate as calibrate_runs

    command = "flowspec calibrate " + " ".join(sys.argv[2:])
    table = calibrate_runs(list(run_dirs), out, min_sets=min_sets, command=command, notes=notes)
    click.echo(report.format_table(table))
    click.echo(f"\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.json')}")


@main.group()
def profile() -> None:
    """Measure this device or a link and write a profile the simulator reads (profiles/README.md)."""


# `flowspec profile device` and `flowspec profile link` are defined below this line.


@profile.command("device")
@click.option("--model", help="Target: smollm2-135m-instruct (the default), a HF model directory or a .gguf file.")
@click.option("--drafter", help="auto, ngram, eagle or lm, as runtime.drafter [auto: the shipped head with prompt "
                                "lookup for the default model, prompt lookup otherwise].")  # fmt: skip
@click.option("--draft-model", help="EAGLE head folder (--drafter eagle) or draft LM directory (--drafter lm).")
@click.option("--device", help="cpu, cuda, mps or auto (cuda, else mps, else cpu) [cpu, as the runtime's stages].")
@click.option("--dtype", help="float32, float16 or bfloat16 [float32, as the runtime].")
@click.option("--threads", type=int, help="torch threads [1, as each runtime stage].")
@click.option("--budget-s", type=float, help="Measurement time to aim at; the grid thins to fit [300].")
@click.option("--grid", "grid_specs", multiple=True, metavar="KEY=V1,V2,...",
              help="Grid axis (repeatable): n_tokens, kv_len, draft_rows, draft_context or tree_size.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Profile folder, profiles/<device>/<model> (its names become the card's device and model).")
@reports_scenario_errors
def profile_device_command(model: str | None, drafter: str | None, draft_model: str | None, device: str | None,
                           dtype: str | None, threads: int | None, budget_s: float | None,
                           grid_specs: tuple[str, ...], out: Path) -> None:  # fmt: skip
    """Measure this device for the simulator: layers, stage overhead, embedding, LM head, the
    drafter the runtime will use, and D0's bookkeeping per step; write stage_forward.csv + meta.json.

    Every component times the runtime's own code on the device and dtype given (profiles/README.md
    says what each one covers). Progress goes to stderr; the card records the machine, the stack
    and this command line.
    """
    from runtime.device_profile import Grid, ProfileOptions, profile_device
    from flowspec.costs import DeviceProfile

    given = {"model": model, "drafter": drafter, "draft_model": draft_model, "device": device, "dtype": dtype,
             "threads": threads, "budget_s": budget_s}  # fmt: skip
    opts = ProfileOptions(out=out, grid=Grid().with_specs(grid_specs), **{k: v for k, v in given.items() if v is not None})
    result = profile_device(opts, echo=lambda m: click.echo(m, err=True))
    click.echo(headline(DeviceProfile.load(result.out)))
    click.echo(f"wrote {result.out}/stage_forward.csv and meta.json ({len(result.rows)} rows, "
               f"{result.meta['wall_s']:.0f} s); it loads in the simulator as devices.stage: {result.out}")


def headline(p: Any) -> str:
    """A few numbers of a loaded DeviceProfile, to eyeball before using it."""
    lines = [f"{p.meta['device']} / {p.meta['model']} on {p.meta.get('cpu_model')} ({p.meta['dtype']}):"]
    for name in ("layer", "stage_overhead", "embed", "head", "draft", "d0_step"):
        if p.has(name):
            g = p.grids[name]
            cells = ", ".join(f"n={n}: {g.at(n, g.kv_axis[0]):.3g}" for n in g.n_axis if n in (1, 4, 16, 64, 256))
            lines.append(f"  {name:15s} ms at kv_len {g.kv_axis[0]:<5d} {cells}")
    return "\n".join(lines)


@profile.command("link")
@click.option("--listen", metavar="[HOST:]PORT",
              help="Answer a peer's measurements here (HOST: every interface if left out; PORT 0: a free one).")
@click.option("--peer", metavar="HOST:PORT", help="Measure the link to a listener there; needs --out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Profile folder, e.g. profiles/links/NAME.")
@click.option("--sizes", metavar="N,N,...", help="Message sizes in bytes, K = KiB, M = MiB [default: 16 B to 4 MiB, "
              "every power of 2].")  # fmt: skip
@click.option("--budget-s", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Time budget of the measurement; every size still gets a few samples.")
@click.option("--duration-s", type=click.FloatRange(min=0, min_open=True),
              help="Stop the listener after this long [default: run until Ctrl-C].")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Give up when the listener is silent for this long.")
@click.option("--notes", help="A caveat for the card: what the link is (hosts, cable, Wi-Fi, shaping).")
def profile_link(listen: str | None, peer: str | None, out: Path | None, sizes: str | None, budget_s: float,
                 duration_s: float | None, timeout_s: float, notes: str | None) -> None:  # fmt: skip
    """Measure a link over ZeroMQ: one-way time and throughput by message size.

    Start `--listen [HOST:]PORT` on one host, then `--peer HOST:PORT --out profiles/links/NAME` on
    the other: the peer writes transfer.csv and meta.json (profiles/README.md, "Link profile"). A
    scenario uses it as a hop's link: network.links: [{profile: links/NAME}, ...].
    """
    import shlex

    from runtime import link_profile as lp

    if (listen is None) == (peer is None):
        raise click.UsageError("give exactly one of --listen [HOST:]PORT and --peer HOST:PORT")
    try:
        if listen is not None:
            if out or sizes:
                raise click.UsageError("--out and --sizes go with --peer (the peer measures and writes the profile)")
            host, port = lp.parse_address(listen, default_host="0.0.0.0")
            command = shlex.join(["flowspec", "profile", "link", "--listen", listen]
                                 + (["--duration-s", f"{duration_s:g}"] if duration_s else []))  # fmt: skip

            def ready(address: str) -> None:
                click.echo(f"listening on {address}; on the other host: flowspec profile link --peer "
                           f"THIS_HOST:{address.rsplit(':', 1)[1]} --out profiles/links/NAME (stop with Ctrl-C)")  # fmt: skip
                sys.stdout.flush()  # a script or a test waits for this line

            try:
                served = lp.serve(host, port, duration_s=duration_s, command=command, on_ready=ready)
            except lp.LinkProfileError as e:  # the address is taken or not this host's
                click.echo(f"error: {e}", err=True)
                raise SystemExit(1) from None
            click.echo(f"stopped after {served} messages")
            return
        if out is None:
            raise click.UsageError("--peer needs --out FOLDER (e.g. profiles/links/NAME)")
        if duration_s is not None:
            raise click.UsageError("--duration-s goes with --listen")
        host, port = lp.parse_address(peer, default_host=None)  # type: ignore[arg-type]
        grid = lp.parse_sizes(sizes) if sizes else lp.DEFAULT_SIZES
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    command = shlex.join(["flowspec", "profile", "link", "--peer", peer, "--out", str(out), "--budget-s", f"{budget_s:g}"]
                         + (["--sizes", sizes] if sizes else []))  # type: ignore[list-item]  # fmt: skip
    try:
        m = lp.measure(host, port, sizes=grid, budget_s=budget_s, timeout_s=timeout_s, command=command)
    except lp.LinkProfileError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    lp.write_profile(out, m, budget_s=budget_s, notes=notes)
    click.echo(f"{'nbytes':>9}  {'one-way ms':>10}  {'p10':>8}  {'p90':>8}  {'Mbit/s':>9}")
    for p in m.points:
        click.echo(f"{p.nbytes:>9}  {p.one_way_ms_median:>10.4f}  {p.one_way_ms_p10:>8.4f}  {p.one_way_ms_p90:>8.4f}  "
                   f"{p.throughput_mbps:>9.1f}")  # fmt: skip
    click.echo(f"wrote {out}/ (transfer.csv, meta.json) in {m.elapsed_s:.1f} s; listener {m.listener['hostname']}, "
               f"peer {m.peer['hostname']}")  # fmt: skip


@main.command()
@scenario_arguments
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [runs/<scenario name>].")
@reports_scenario_errors
def hetedge(scenario: Path, overrides: tuple[str, ...], out: Path | None) -> None:
    """Heterogeneous-edge speculative serving (arXiv 2510.11331) on a hetedge SCENARIO.

    Many users upload prompts over a shared wireless uplink to an edge node that drafts; a strong
    node verifies. Plans the uplink split, batches and speculation lengths jointly, then simulates
    that plan against the paper's baselines (uniform uplink, maximal batching, autoregressive).
    Prints a table; writes hetedge.csv and hetedge.png. Model and assumptions: sim/hetedge.py.
    """
    import pandas as pd

    import report
    from report.folder import claimed
    from sim.hetedge import compare, load

    sc = load(scenario, overrides)
    table = pd.DataFrame(compare(sc))
    click.echo(report.format_table(table))
    with claimed(out or Path("runs") / sc.name, chosen=out is not None, echo=say) as folder:
        table.to_csv(folder / "hetedge.csv", index=False)
        plot = report.plot_hetedge(table, folder / "hetedge.png")
    click.echo(f"\nwrote {folder}/hetedge.csv, {plot.name}")
