"""The `flowspec` command: a thin click layer over plain, importable functions.

Rules: a command parses its options, calls one function, prints the result. Defaults are never
declared here: a scenario file plus `--set dotted.key=value` overrides say everything, and the
dataclasses in `flowspec/config.py` own every default. Exit codes: 0 ok, 1 the run failed (a
peer failed, timed out or stopped moving: one line naming it; otherwise a traceback, since that is
a bug or an environment problem), 2 bad input (scenario, profile, prompts, model, keys, port: one
line on stderr, no traceback; click's own usage errors share code 2), 130 interrupted (Ctrl-C),
143 terminated (SIGTERM); interrupted or not, finished work is written and no stage is left.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import click

from flowspec.config import ScenarioError, dump_scenario, load_scenario
from runtime.drafthead.evaluate import BENCH_DRAFTERS

EXIT_BAD_SCENARIO = 2

F = TypeVar("F", bound=Callable[..., Any])


def _version() -> str:
    try:
        return version("flowspec")
    except PackageNotFoundError:  # running from a checkout that was never installed
        from flowspec import __version__

        return __version__


def scenario_arguments(command: F) -> F:
    """Add the SCENARIO argument and repeatable `--set KEY=VALUE` overrides to a command."""
    command = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one scenario value, e.g. --set tree.topk=8 (repeatable; VALUE is YAML).",
    )(command)
    return click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))(command)


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (scenario, profile, trace file, model path): exit 2, no traceback."""
    from runtime.channel import ListenError
    from runtime.models import ModelError  # lazily: `flowspec check` needs neither backend
    from runtime.security import KeysError
    from flowspec.costs import ProfileError
    from sim.replay import RunFolderError

    return (ScenarioError, ProfileError, ModelError, RunFolderError, ListenError, KeysError)


def _runtime_failures() -> tuple[type[Exception], ...]:
    """A run that failed for a reason outside this process (a stage died, timed out, sent garbage):
    one line naming the stage and exit code 1, no traceback of our own."""
    from flowspec.pipeline import ProtocolError
    from runtime.channel import RemoteError, StageTimeout

    return (StageTimeout, RemoteError, ProtocolError)


def say(message: str) -> None:
    """A note for the user on stderr (stdout carries the results)."""
    click.echo(message, err=True)


def reports_scenario_errors(command: F) -> F:
    """Turn bad input anywhere in `command` into `error: ...` on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ScenarioError as e:
            click.echo(f"error: {e}", err=True)
            raise SystemExit(EXIT_BAD_SCENARIO) from None
        except Exception as e:
            if isinstance(e, _input_errors()):
                click.echo(f"error: {e}", err=True)
                raise SystemExit(EXIT_BAD_SCENARIO) from None
            raise

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), prog_name="flowspec")
def main() -> None:
    """FlowSpec: continuous pipelined speculative decoding across edge devices."""


@main.command()
@scenario_arguments
@reports_scenario_errors
def check(scenario: Path, overrides: tuple[str, ...]) -> None:
    """Validate a scenario and print it resolved.

    Prints SCENARIO with the --set overrides applied and every default filled in, as YAML that
    loads back to the same scenario. Everything `simulate` reads before it runs is read here too
    (device and link profiles, the acceptance profile, a trace), so what passes here runs there.
    """
    import dataclasses

    from sim.experiment import build_engine

    sc = load_scenario(scenario, overrides)
    # dsd's relaxed acceptance runs in the runtime only; the rest of such a scenario still must load
    strict = dataclasses.replace(sc, dsd=dataclasses.replace(sc.dsd, tau=0.0)) if sc.relaxed else sc
    build_engine(strict, base_dir=scenario.parent)
    click.echo(dump_scenario(sc), nl=False)


def chosen_policies(names: tuple[str, ...], default: str) -> list[Any]:
    from flowspec.config import Policy

    if not names:
        return [Policy(default)]
    if "all" in names:
        return list(Policy)
    known = ", ".join(p.value for p in Policy)
    out = []
    for name in names:
        try:
            out.append(Policy(name))
        except ValueError:
            raise click.BadParameter(f"unknown policy {name!r} (known: {known}, all)", param_hint="--policy") from None
    return out


policy_option = click.option(
    "--policy",
    "policies",
    multiple=True,
    metavar="NAME",
    help="Policy to run, repeatable, or 'all'; default: the scenario's policy.",
)


@main.command()
@scenario_arguments
@policy_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [runs/<scenario name>].")
@click.option("--plots/--no-plots", default=True, help="Write PNG plots and the trace.")
@reports_scenario_errors
def simulate(scenario: Path, overrides: tuple[str, ...], policies: tuple[str, ...], out: Path | None, plots: bool) -> None:
    """Simulate SCENARIO for one or more policies and compare them.

    Prints a table (tokens/s, speed-ups, accepted tokens per step, TTFT, TPOT) and per-stage
    utilization; writes the resolved scenario, record frames (parquet) per policy, a Chrome/Perfetto
    trace and PNG plots into the output folder. Results of policies that finished are written even
    if a later one fails.
    """
    import report
    from sim.outputs import simulate_and_save
    from report.folder import claimed

    sc = load_scenario(scenario, overrides)
    chosen = chosen_policies(policies, sc.policy)
    with claimed(out or Path("runs") / sc.name, chosen=out is not None, echo=say) as folder:
        click.echo(f"simulating {sc.name} ({', '.join(map(str, chosen))}) into {folder}/", err=True)
        done, error = simulate_and_save(sc, chosen, folder, base_dir=scenario.parent, echo=click.echo)
        if done:
            report.write_comparison(done, folder, plots=plots, echo=click.echo)
    if error is not None:
        raise error


@main.command()
@scenario_arguments
@policy_option
@click.option("--grid", "grids", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="A scenario key and the values to sweep (repeatable: the grid is their product).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Worker processes.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [runs/<scenario name>-sweep].")
@reports_scenario_errors
def sweep(scenario: Path, overrides: tuple[str, ...], policies: tuple[str, ...], grids: tuple[str, ...],
          workers: int, out: Path | None) -> None:  # fmt: skip
    """Simulate a grid of scenario variants in parallel; write one frame and a plot.

    Example: flowspec sweep scenarios/bandwidth.yaml --grid network.bandwidth_mbps=125,250,500,1000
    --policy flowspec --policy chunk-pp
    """
    import report
    from sim.outputs import sweep_and_save
    from report.folder import claimed
    from tqdm import tqdm

    grid: dict[str, list[str]] = {}
    for item in grids:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise click.BadParameter(f"expected KEY=V1,V2,..., got {item!r}", param_hint="--grid")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    sc = load_scenario(scenario, overrides)
    chosen = chosen_policies(policies, sc.policy)
    with claimed(out or Path("runs") / f"{sc.name}-sweep", chosen=out is not None, echo=say) as folder, \
            tqdm(total=0, unit="run", desc="sweep", file=sys.stderr) as bar:  # fmt: skip

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        frame = sweep_and_save(sc, grid, chosen, folder, workers=workers, source=str(scenario), progress=progress)
        keys = list(grid)
        y_key = keys[1] if len(keys) > 1 else None
        batched = "max_concurrent" in frame and bool((frame["max_concurrent"] > 1).any())
        metric = "throughput_tokens_per_s" if batched else "tokens_per_s"  # batches: the workload's rate
        plot = report.plot_sweep(frame, keys[0], metric, path=folder / "sweep.png", **({"y_key": y_key} if y_key else {}))
    columns = ["policy", "tokens_per_s", "accepted_per_step", "ttft_s", "tpot_s"]
    if batched:
        columns[2:2] = ["throughput_tokens_per_s", "max_concurrent"]
    click.echo(report.format_table(frame[keys + columns]))
    click.echo(f"\nwrote {folder}/sweep.csv, sweep.parquet, {plot.name}")


@main.command()
@scenario_arguments
@policy_option
@click.option("--prompt", help="One prompt (the chat template is applied for instruct models).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL, one request per line: prompt, messages/input (chat) or tokens; optional max_new_tokens.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder [runs/<scenario name>-runtime].")
@click.option("--plots/--no-plots", default=True, help="Write PNG plots and the trace.")
@click.option("--stream/--no-stream", default=True, help="Print the first policy's text as it is generated.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), metavar="RUN_DIR",
              help="Finish a failed run of SCENARIO: keep what it finished, continue its unfinished request from the "
                   "last committed token (token-exact at T = 0), serve the rest, with its policy [out: RUN_DIR-resumed].")
@reports_scenario_errors
def run(scenario: Path, overrides: tuple[str, ...], policies: tuple[str, ...], prompt: str | None,
        prompts_file: Path | None, out: Path | None, plots: bool, stream: bool, resume: Path | None) -> None:  # fmt: skip
    """Run SCENARIO for real: D0 here, one process per stage over ZeroMQ.

    Without runtime.hosts every stage runs on this machine over loopback (one torch thread each);
    with them, D0 listens at hosts[0] and each board runs `flowspec stage SCENARIO --rank R`.
    Prints the text, then per-policy metrics; writes the same record frames as `simulate`.
    Prompts: --prompt, --prompts FILE.jsonl, or built-in ones (workload.n_requests of them).
    After a failure (a board lost, a timeout), --resume RUN_DIR with the same scenario finishes it.
    """
    import report
    from runtime.outputs import run_and_save
    from runtime.resume import FailedRun
    from report.folder import claimed

    if prompt is not None and prompts_file is not None:
        raise click.BadParameter("give --prompt or --prompts, not both", param_hint="--prompt")
    if resume is not None and (prompt is not None or prompts_file is not None or policies):
        raise click.BadParameter("--resume serves the failed run's requests with its policy: drop --prompt, --prompts "
                                 "and --policy", param_hint="--resume")  # fmt: skip
    sc = load_scenario(scenario, overrides)
    failed = None if resume is None else FailedRun.read(resume)
    chosen = [failed.policy] if failed else chosen_policies(policies, sc.policy)
    target = failed.out_folder(out) if failed else out or Path("runs") / f"{sc.name}-runtime"
    with claimed(target, chosen=out is not None, echo=say) as folder:
        done, error, _ = run_and_save(sc, chosen, folder, base_dir=scenario.parent, prompt=prompt,
                                      prompts_file=prompts_file, echo=click.echo, stream=stream, resume=failed)  # fmt: skip
        if done:
            report.write_comparison(done, folder, plots=plots, echo=click.echo)
    if error is not None:
        import gc

        gc.freeze()  # all is written: spare the exit a walk over torch's heap (1-2 s on a busy machine)
        if isinstance(error, _runtime_failures()):
            click.echo(f"error: {error}", err=True)
            raise SystemExit(1)
        raise error


@main.command()
@scenario_arguments
@click.option("--rank", type=click.IntRange(min=1), required=True, help="This board's stage, 1..pipeline.n_stages.")
@reports_scenario_errors
def stage(scenario: Path, overrides: tuple[str, ...], rank: int) -> None:
    """Serve one pipeline stage of SCENARIO on this board (testbed mode).

    Listens on runtime.base_port + RANK and reports to D0 at runtime.hosts[0]; run
    `flowspec run SCENARIO` on the draft node and this command on each stage's board.
    """
    from runtime.models import resolve_model
    from runtime.security import with_keys_resolved
    from runtime.stage import run_stage, testbed_plan

    sc = with_keys_resolved(load_scenario(scenario, overrides), scenario.parent)
    if not sc.runtime.hosts:
        raise ScenarioError(f"{scenario}: runtime.hosts must list the testbed (D0 first) for `flowspec stage`")
    if rank > sc.pipeline.n_stages:
        raise ScenarioError(f"{scenario}: --rank {rank} but pipeline.n_stages is {sc.pipeline.n_stages}")
    model_dir = resolve_model(sc.runtime.model, base_dir=scenario.parent, echo=lambda m: click.echo(m, err=True))
    from runtime.launcher import with_model_shapes

    sc = with_model_shapes(sc, model_dir)  # the real model's layer count decides the split
    plan = testbed_plan(sc, rank)  # reads the keys and resolves the hosts: bad input ends here, with exit 2
    click.echo(f"stage {rank}: listening on port {sc.runtime.base_port + rank}, D0 at {sc.runtime.hosts[0]}"
               f"{', CURVE on' if plan.keyring else ''}", err=True)  # fmt: skip
    raise SystemExit(run_stage(plan, model_dir, sc.runtime.torch_threads))


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the keys.")
@click.option("--stages", "n_stages", type=click.IntRange(min=1), required=True, help="pipeline.n_stages of the testbed.")
@reports_scenario_errors
def keys(out: Path, n_stages: int) -> None:
    """Make CURVE keys for a testbed: one pair for D0 and one per stage.

    Writes d0.key and d0.key_secret, then stage1.key, stage1.key_secret, ... into OUT. A .key file
    is public; a .key_secret file is that process's secret. Each board gets a folder holding its
    own secret (D0: d0.key_secret; the board of stage R: stageR.key_secret) and every .key file,
    and names that folder in runtime.keys with runtime.security: curve. Keep secrets off the other
    boards: whoever holds one can speak as that process. Run it again into a new folder to change keys.
    """
    from runtime.security import make_keys

    written = make_keys(out, n_stages)
    click.echo(f"wrote {len(written) // 2} key pairs into {out}/: d0 and stage1..stage{n_stages} (.key public, "
               f".key_secret secret); copy to each board its own .key_secret and every .key")


@main.command("train-draft")
@click.option("--target", default="smollm2-135m-instruct", show_default=True,
              help="Target model: smollm2-135m-instruct, a HF model directory or a .gguf file.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the head.")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL prompt files (repeatable).")
@click.option("--prompt-set", "prompt_sets", multiple=True, metavar="NAME|all",
              help="Prompt sets shipped in PyPI wheels (repeatable; `all` for every set). Default without "
                   "--prompts: all, plus the built-in prompts.")  # fmt: skip
@click.option("--per-set", type=click.IntRange(min=1), default=75, show_default=True, help="Prompts per set.")
@click.option("--exclude", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Benchmark JSONL files: drop training prompts that overlap their questions.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=320, show_default=True,
              help="Skip longer prompts.")
@click.option("--minutes", type=click.FloatRange(min=0), default=10.0, show_default=True, help="Time budget of the fit.")
@click.option("--steps", type=click.IntRange(min=0), help="Stop after this many optimiser steps.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--draft-vocab", type=click.IntRange(min=0), default=8192, show_default=True,
              help="Draft over the N tokens the target predicts most often (0: the full vocabulary).")
@click.option("--rollout", type=click.IntRange(min=1), default=3, show_default=True,
              help="Training-time rollout steps (the head learns to read its own predictions).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Reuse the cached target answers and the last checkpoint in --out.")
@reports_scenario_errors
def train_draft_command(target: str, out: Path, prompt_files: tuple[Path, ...], prompt_sets: tuple[str, ...],
                        per_set: int, exclude: tuple[Path, ...], max_prompt_tokens: int, minutes: float,
                        steps: int | None, max_new_tokens: int, draft_vocab: int, rollout: int, seed: int,
                        resume: bool) -> None:  # fmt: skip
    """Train an EAGLE-style draft head for TARGET; save EAGLE's checkpoint layout and a card."""
    from runtime.models import load_model, load_tokenizer, resolve_model
    from runtime.drafthead.prompt_sets import SET_NAMES, training_prompts
    from runtime.prompts import BUILTIN_PROMPTS, encode, read_jsonl
    from runtime.drafthead.train import TrainConfig, train_draft

    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    model_dir = resolve_model(target, echo=echo)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    prompts = [tokens for f in prompt_files for tokens, _ in read_jsonl(f, tokenizer)]
    sources = ["file"] * len(prompts)
    if prompt_sets or not prompt_files:
        if tokenizer is None:
            raise ScenarioError(f"--prompt-set: {model_dir} has no tokenizer, so give token-id prompts with --prompts")
        names = list(SET_NAMES) if not prompt_sets or "all" in prompt_sets else list(prompt_sets)
        pairs = training_prompts(names, per_set=per_set, seed=seed, exclude=list(exclude), echo=echo)
        if not prompt_sets:
            pairs += [("builtin", t) for t in BUILTIN_PROMPTS]
        encoded = [(name, encode(tokenizer, text)) for name, text in pairs]
        kept = [(name, ids) for name, ids in encoded if len(ids) <= max_prompt_tokens]
        echo(f"{len(kept)} prompts from {len(names)} sets ({len(encoded) - len(kept)} over {max_prompt_tokens} tokens skipped)")
        prompts += [ids for _, ids in kept]
        sources += [name for name, _ in kept]
    config = TrainConfig(minutes=minutes, max_steps=steps, max_new_tokens=max_new_tokens, draft_vocab=draft_vocab,
                         rollout=rollout, seed=seed)  # fmt: skip
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    train_draft(model, prompts, out, config, eos=eos, resume=resume, echo=echo, target_name=str(target),
                sources=sources)  # fmt: skip
    click.echo(f"wrote {out}/ (model.safetensors, config.json, card.json); use it with "
               f"--set runtime.drafter=eagle --set runtime.draft_model={out}")


@main.group()
def bench() -> None:
    """Benchmarks: print a table and write a CSV; speeds are measured side by side in one run."""


@bench.command("sim")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path), default="scenarios/sparse-edge.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one scenario value.")
@policy_option
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Runs per policy (the best counts).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs/bench-sim.csv"), show_default=True)
@click.option("--profile", is_flag=True, help="Also print where the simulator's time goes (cProfile).")
@reports_scenario_errors
def bench_sim(scenario: Path, overrides: tuple[str, ...], policies: tuple[str, ...], repeat: int, out: Path,
              profile: bool) -> None:  # fmt: skip
    """Simulated output tokens per wall-clock second, per policy (simulator speed)."""
    import report
    from sim.outputs import bench_policies

    sc = load_scenario(scenario, overrides)
    chosen = chosen_policies(policies, sc.policy) if policies else chosen_policies(("all",), sc.policy)
    frame, hot = bench_policies(sc, chosen, repeat=repeat, base_dir=scenario.parent, profile=profile)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    click.echo(report.format_table(frame))
    if hot:
        click.echo("\nwhere the time goes (last run of each policy, by own time):\n" + hot)
    click.echo(f"\nwrote {out}")


@bench.command("draft")
@click.option("--head", "head_dir", type=click.Path(file_okay=False, path_type=Path),
              help="EAGLE head folder; default: the head shipped for the default target.")
@click.option("--target", default="smollm2-135m-instruct", show_default=True, help="Target model (as train-draft).")
@click.option("--prompts", "prompt_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL prompt sets (repeatable, one table group per file); default: the built-in prompts.")
@click.option("--per-set", type=click.IntRange(min=1), default=20, show_default=True, help="Prompts per set.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--tree", "tree_spec", default=None, metavar="TOTAL,TOPK,DEPTH",
              help="EAGLE-2 tree; default: the runtime's default tree.")
@click.option("--drafter", "drafters", multiple=True, type=click.Choice(BENCH_DRAFTERS),
              help="Drafters to score (repeatable); default: all.")
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write cProfile statistics of the replays to this file and print the top entries.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs/bench-draft.csv"), show_default=True)
@reports_scenario_errors
def bench_draft_command(head_dir: Path | None, target: str, prompt_files: tuple[Path, ...], per_set: int,
                        max_new_tokens: int, tree_spec: str | None, drafters: tuple[str, ...], profile: Path | None,
                        out: Path) -> None:  # fmt: skip
    """Drafters scored on the target's own answers: tokens per verification, depth reached, growth time.

    Replays an EAGLE-2 tree at every verification of the target's greedy answers (T = 0) for the
    EAGLE head over its draft vocabulary (eagle), the same with prompt lookup merged in as the
    runtime drafts by default (eagle+lookup; int8 weights on x86, runtime.draft_int8), the same in
    exact fp32 (eagle+lookup-fp32), the head over the full vocabulary (eagle-full), and prompt
    lookup alone (lookup). Writes the table as CSV, every verification next to it, and a plot of
    depth reached.
    """
    import report
    from flowspec.config import RuntimeConfig, TreeConfig
    from runtime.drafthead.evaluate import bench_draft
    from runtime.eagle import default_head

    tree = TreeConfig()
    if tree_spec is not None:
        try:
            total, topk, depth = (int(v) for v in tree_spec.split(","))
            tree = TreeConfig(total=total, topk=topk, depth=depth)
        except ValueError as e:
            raise ScenarioError(f"--tree: expected TOTAL,TOPK,DEPTH integers, got {tree_spec!r} ({e})") from None
    head_dir = head_dir or default_head(target, "--head")
    summary, rows = bench_draft(target, head_dir, list(prompt_files), per_set=per_set, max_new_tokens=max_new_tokens,
                                tree=tree, ngram_max=RuntimeConfig().ngram_max,
                                echo=lambda m: click.echo(m, err=True), which=drafters or BENCH_DRAFTERS,
                                profile=profile)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out, index=False)
    rows_path = out.with_name(out.stem + "-verifications.csv")
    rows.to_csv(rows_path, index=False)
    plot_path = out.with_suffix(".png")
    report.plot_reach(summary, plot_path, tree.depth + 1)
    click.echo(report.format_table(summary))
    click.echo(f"\ntree: total {tree.total}, topk {tree.topk}, depth {tree.depth}; mean_accepted counts the "
               f"bonus token; reach_d: share of verifications accepting >= d draft tokens; grow_ms: median")
    click.echo(f"wrote {out}, {rows_path}, {plot_path}")


@bench.command("runtime")
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path), default="scenarios/loopback.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one scenario value.")
@policy_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs/bench-runtime.csv"), show_default=True)
@reports_scenario_errors
def bench_runtime_command(scenario: Path, overrides: tuple[str, ...], policies: tuple[str, ...], out: Path) -> None:
    """Real tokens/s per policy on loopback stages, beside single-process HF generate."""
    import report
    from runtime.bench import CAVEAT, bench_runtime

    sc = load_scenario(scenario, overrides)
    chosen = chosen_policies(policies or ("all",), sc.policy)
    generations = out.with_suffix("")  # runs/bench-runtime/<policy>/outputs.jsonl beside runs/bench-runtime.csv
    frame = bench_runtime(sc, chosen, base_dir=scenario.parent, echo=lambda m: click.echo(m, err=True),
                          outputs_dir=generations)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    click.echo(report.format_table(frame))
    click.echo(f"\nnote: {CAVEAT}\nwrote {out} and every policy's generations under {generations}/")


# The commands of the validation loop (profile device/link, replay, calibrate) live in cli_measure;
# importing it registers them on `main`. Last, because it imports what this module defines.
import cli_measure  # noqa: E402, F401

if __name__ == "__main__":
    cli_measure.main()  # `python -m cli`: the `cli` module's group, which cli_measure registered on
