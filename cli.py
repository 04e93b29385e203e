"""The `flowspec` command: a thin click layer over plain, importable functions.

Rules: a command parses its options, calls one function, prints the result. Defaults are never
declared here: a scenario file plus `--set dotted.key=value` overrides say everything, and the
dataclasses in `flowspec/config.py` own every default. Exit codes: 0 ok, 1 the run failed (a
traceback, since that is a bug or an environment problem), 2 the scenario is invalid (one line
on stderr, no traceback; click's own usage errors share code 2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import click

from flowspec.config import ScenarioError, dump_scenario, load_scenario

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


def reports_scenario_errors(command: F) -> F:
    """Turn a ScenarioError anywhere in `command` into `error: ...` on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ScenarioError as e:
            click.echo(f"error: {e}", err=True)
            raise SystemExit(EXIT_BAD_SCENARIO) from None

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
    loads back to the same scenario.
    """
    click.echo(dump_scenario(load_scenario(scenario, overrides)), nl=False)


if __name__ == "__main__":
    main()
