"""Starting a run: the target, the drafter, stage processes on loopback or a testbed, cleanup.

Theory of operation
-------------------
`Target.load` resolves the scenario's model (see `runtime.models`), reads its shapes into the
scenario (the runtime's `model` section is the real model's, whatever the file said) and keeps
what D0 needs, read by name from the checkpoint: the LM head, the embedding, the tokenizer and the
EOS id. The whole model is loaded only where something asks for it (`generate`, profiling).

`Cluster` is a context manager for a loopback run: it binds D0's inbox in this process,
starts one `python -m runtime.stage` child per stage (one torch thread each, logs in a temporary
folder), and connects. Leaving the block — normally, by an exception, or by a signal (under
`runtime.shutdown.signals_raise`, SIGINT and SIGTERM are exceptions too) — stops the children,
waits briefly, then terminates and finally kills whatever is left, and removes the temporary
folder, so nothing outlives the run; a signal during that cleanup waits for its end
(`shielded`). The children run in a session of their own: a terminal's Ctrl-C, or `timeout`
signalling its process group, reaches D0 alone, which stops them in order instead of racing their
deaths. A child whose launcher vanishes (SIGKILL) notices and exits (`StagePlan.watch_parent`).
While serving, D0 polls the children: one that exits is reported by rank with its exit status and
the tail of its log. With `runtime.hosts` set it is a testbed instead: D0 listens at
hosts[0]:base_port and each board runs `flowspec stage SCENARIO --rank R`; every inbox then hears
only the hosts' addresses, and with `runtime.security: curve` only holders of the testbed's keys
(`runtime.security`).

One cluster serves several policies in turn (stages are policy-agnostic); single-sd needs a
one-stage cluster of its own. `run_policies` yields each policy's result as soon as it exists,
so a caller can write it before the next one starts.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowspec.config import DrafterKind, Policy, Scenario, ScenarioError, dump_scenario, scenario_from_dict, scenario_to_dict
from flowspec.policy import batch_size, device_scenario, spec
from flowspec.tree import Drafter
from runtime import wire
from runtime.channel import Endpoint, RemoteError
from flowspec.records import RunResult
from flowspec.workload import Request
from runtime.draft_node import DraftNode
from runtime.models import (Echo, check_devices, load_model, load_tokenizer, quiet, read_head,
                            resolve_model)  # fmt: skip
from runtime.security import keyring_for, peer_addresses, with_keys_resolved
from runtime.shutdown import shielded
from runtime.stage import layer_ranges

LOG_TAIL_LINES = 25


@dataclass
class Target:
    scenario: Scenario  # with the real model's shapes and EOS
    model_dir: Path
    lm_head: Any  # torch.Tensor [V, H]
    embed: Any  # torch.Tensor [V, H]
    tokenizer: Any  # None for models without one
    _model: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, scenario: Scenario, *, base_dir: Path | None = None, echo: Echo = quiet) -> Target:
        """D0's share of the target: its LM head and input embedding (the EAGLE drafter reads
        both), read by name; the decoder layers stay on the stages. runtime.keys comes back
        absolute, and D0's keys are read here, before anything loads or starts."""
        check_devices(scenario)  # before anything loads or starts
        scenario = with_keys_resolved(scenario, base_dir)  # the stages read a copy of the scenario elsewhere
        keyring_for(scenario, 0)
        model_dir = resolve_model(scenario.runtime.model, base_dir=base_dir, echo=echo)
        head, embed = read_head(model_dir, with_embedding=True)
        return cls(with_model_shapes(scenario, model_dir), model_dir, head, embed, load_tokenizer(model_dir))

    @property
    def model(self) -> Any:
        """The whole model, loaded on first use: `generate` and profiling need it, a run does not."""
        if self._model is None:
            self._model = load_model(self.model_dir)
        return self._model


def with_model_shapes(scenario: Scenario, model_dir: Path) -> Scenario:
    """`scenario` with the model section (and EOS) of the model in `model_dir`, validated again."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    data = scenario_to_dict(scenario)
    data["model"].update(n_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                         vocab_size=config.vocab_size, dtype=scenario.runtime.dtype,
                         context_tokens=int(getattr(config, "max_position_embeddings", 0) or 0))  # fmt: skip
    eos = scenario.decoding.eos_token_id
    if eos is None and scenario.runtime.stop_at_eos:
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        eos = eos if eos is not None else config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
    data["decoding"]["eos_token_id"] = eos
    try:
        return scenario_from_dict(data, f"{scenario.name} with model {model_dir.name}")
    except ScenarioError as e:
        raise ScenarioError(f"{e} (the model has {config.num_hidden_layers} layers)") from None


def drafter_kind(scenario: Scenario) -> DrafterKind:
    """runtime.drafter with `auto` resolved: eagle where a head is named or ships, else ngram."""
    return scenario.runtime.drafter_kind


def merges_lookup(scenario: Scenario) -> bool:
    """Whether prompt lookup is merged into a model drafter's proposals (runtime.draft_lookup)."""
    return drafter_kind(scenario) is not DrafterKind.NGRAM and scenario.runtime.draft_lookup


def make_drafter(scenario: Scenario, target: Target, *, base_dir: Path | None = None) -> Drafter:
    """The drafter the scenario names (runtime.drafter), with prompt lookup merged into a model
    drafter's proposals unless runtime.draft_lookup is off."""
    from flowspec.lookup import PromptLookupDrafter, WithLookup

    rt = scenario.runtime
    if drafter_kind(scenario) is DrafterKind.NGRAM:
        return PromptLookupDrafter(scenario.model.vocab_size, max_n=rt.ngram_max)
    model = _model_drafter(scenario, target, base_dir)
    return WithLookup(model, scenario.model.vocab_size, max_n=rt.ngram_max) if merges_lookup(scenario) else model


def _model_drafter(scenario: Scenario, target: Target, base_dir: Path | None) -> Drafter:
    rt = scenario.runtime
    kind = drafter_kind(scenario)
    if kind is DrafterKind.LM:
        from runtime.drafters import CausalLMDrafter

        assert rt.draft_model is not None
        path = resolve_model(rt.draft_model, base_dir=base_dir)
        return CausalLMDrafter(load_model(path), vocab_size=scenario.model.vocab_size, int8=rt.draft_int8)
    from runtime.eagle import EagleDrafter, default_head, load_eagle

    if rt.draft_model:
        folder = Path(rt.draft_model).expanduser()
        folder = folder if folder.is_absolute() or base_dir is None else base_dir / folder
    else:
        folder = default_head(rt.model)
    return EagleDrafter(load_eagle(folder, scenario.model.hidden_size), target.embed, target.lm_head,
                        full_vocab=rt.draft_full_vocab, int8=rt.draft_int8)  # fmt: skip


def stage_scenario(scenario: Scenario, policy: Policy) -> Scenario:
    """The scenario a policy's cluster runs: single-sd is one stage holding every layer."""
    return device_scenario(dataclasses.replace(scenario, policy=policy))


class Cluster:
    """D0 in this process and its stages: child processes on loopback, or (with runtime.hosts) the
    testbed's `flowspec stage` processes, which connect to D0 themselves. See the module docstring."""

    def __init__(self, scenario: Scenario, target: Target, *, echo: Echo = quiet, emulated: Scenario | None = None) -> None:
        self.scenario = scenario
        self.emulated = emulated  # the scenario as the simulator reads it, for an emulated testbed
        self.target = target
        self.echo = echo
        self.ranges = layer_ranges(scenario)
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self.node: DraftNode | None = None
        self.endpoint: Endpoint | None = None
        self.folder: Path | None = None

    def __enter__(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        rt = self.scenario.runtime
        if rt.hosts:
            self.endpoint = Endpoint(0, rt.hosts[0], rt.base_port, bind_host="0.0.0.0",
                                     max_header_nbytes=wire.MAX_REPORT_NBYTES,  # stages' reports list every span
                                     keyring=keyring_for(self.scenario, 0), allowed=peer_addresses(rt.hosts))  # fmt: skip
            self.echo(f"D0 listening at {self.endpoint.address}; start each stage on its board with "
                      f"`flowspec stage SCENARIO --rank R` (R = 1..{len(self.ranges)})")  # fmt: skip
            self.node = DraftNode(self.scenario, self.endpoint, self.target.lm_head, self.ranges)
            self.node.connect()
            self.echo("stages ready")
            return
        self.folder = Path(tempfile.mkdtemp(prefix="flowspec-stages-"))
        spec = self.folder / "scenario.yaml"
        spec.write_text(dump_scenario(self.scenario))
        emulate: list[str] = []
        if self.emulated is not None and self.emulated.emulate.dilation:
            (self.folder / "emulated.yaml").write_text(dump_scenario(self.emulated))
            emulate = ["--emulated", str(self.folder / "emulated.yaml")]
        self.endpoint = Endpoint(0, max_header_nbytes=wire.MAX_REPORT_NBYTES, keyring=keyring_for(self.scenario, 0))
        n = len(self.ranges)
        self.echo(f"starting {n} stage process(es) on loopback ({self.target.model_dir.name})")
        for rank in range(1, n + 1):
            log = self.folder / f"stage{rank}.log"
            self.logs[rank] = log
            cmd = [sys.executable, "-m", "runtime.stage", str(spec), "--rank", str(rank), "--d0",
                   self.endpoint.address, "--model-dir", str(self.target.model_dir), *emulate]  # fmt: skip
            with open(log, "wb") as out:
                self.procs[rank] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                    start_new_session=True)  # fmt: skip
        self.node = DraftNode(self.scenario, self.endpoint, self.target.lm_head, self.ranges, check_peers=self.check)
        t = time.monotonic()
        self.node.connect()
        self.echo(f"stages ready in {time.monotonic() - t:.1f} s")

    def check(self) -> None:
        """Raise if a stage process has exited (it should live until we stop it)."""
        for rank, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                raise RemoteError(f"stage {rank} (pid {proc.pid}) exited with {_status(code)}{self._tail(rank)}")

    def _tail(self, rank: int) -> str:
        try:
            lines = self.logs[rank].read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return ("; its log ends:\n  " + "\n  ".join(lines)) if lines else ""

    def serve(self, scenario: Scenario, drafter: Drafter, requests: list[Request], **kwargs: Any) -> RunResult:
        """Serve `requests` with `scenario`'s policy. A batching policy's lanes each get a fork of a
        drafter that keeps a request's state (the EAGLE head's features); a stateless one is shared."""
        assert self.node is not None
        lanes = batch_size(scenario)
        fork = getattr(drafter, "fork", None)
        drafters = [drafter] + [fork() for _ in range(lanes - 1)] if lanes > 1 and fork is not None else drafter
        result = self.node.serve(scenario, drafters, requests, **kwargs)
        for rank, n in self.node.rejected.items():
            if n:  # stray or hostile traffic reached a stage: what it was is in the stage's log
                self.echo(f"stage {rank} rejected {n} frame(s) during this run (malformed, or not fitting its state)")
        return result

    def close(self) -> None:
        with shielded():
            if self.node is not None:
                self.node.stop()
            for proc in self.procs.values():
                if _stopped(proc.pid):  # SIGSTOPped: it can read no stop message and defers SIGTERM
                    proc.kill()
            deadline = time.monotonic() + 2.0  # told to stop, a healthy stage exits within milliseconds
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.terminate()
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:  # hung, or stopped (SIGSTOP defers SIGTERM)
                    proc.kill()
                    proc.wait()
            if self.endpoint is not None:
                self.endpoint.close()
                self.endpoint = None
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = None


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP, or a debugger); False where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("T", "t")  # the state follows "(comm) "


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_policies(
    scenario: Scenario,
    target: Target,
    policies: Sequence[Policy],
    requests: list[Request],
    *,
    drafter: Callable[[Scenario], Drafter],
    echo: Echo = quiet,
    on_tokens: Callable[[Policy, int, tuple[int, ...]], None] | None = None,
    emulated: Scenario | None = None,
    on_failure: Callable[[Policy, RunResult | None], None] | None = None,
) -> Iterator[tuple[Policy, RunResult]]:
    """Each policy's result on loopback, as soon as it exists (pipelined policies share a cluster).
    `emulated`: the scenario as the simulator reads it (its model, devices and network), when
    emulate.dilation makes this an emulated testbed (`runtime.emulation`). `on_failure`: given the
    requests a policy finished before its run failed (`DraftNode.completed`), before the error
    goes on and the cluster closes; it should only keep them, since the stages wait for it."""
    groups: list[list[Policy]] = [[p for p in policies if not spec(p).one_device],
                                  [p for p in policies if spec(p).one_device]]  # fmt: skip
    for group in groups:
        if not group:
            continue
        base = stage_scenario(scenario, group[0])
        if spec(group[0]).one_device and scenario.runtime.hosts:
            raise ScenarioError(f"policy {group[0]} runs on one device: leave runtime.hosts empty (loopback) for it")
        emulated_base = None if emulated is None else stage_scenario(emulated, group[0])
        with Cluster(base, target, echo=echo, emulated=emulated_base) as cluster:
            for policy in group:
                sc = stage_scenario(scenario, policy)
                tokens_cb = None if on_tokens is None else (lambda rid, toks, p=policy: on_tokens(p, rid, toks))
                started = False
                try:
                    chosen = drafter(sc)
                    started = True
                    result = cluster.serve(sc, chosen, requests, run_id=f"{sc.name}/{policy}", on_tokens=tokens_cb,
                                           emulated=None if emulated is None else stage_scenario(emulated, policy))  # fmt: skip
                except BaseException:
                    if started and on_failure is not None and cluster.node is not None:
                        with shielded():
                            on_failure(policy, cluster.node.completed())
                    raise
                yield policy, result
