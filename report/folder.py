"""Output folders one run at a time: a run claims its folder, a concurrent run never writes into it.

Two runs of one scenario used to share `runs/<name>/` and overwrite each other's frames, CSVs and
plots mid-write. A run now holds an advisory lock (`fcntl.flock` on `.flowspec.lock` in the folder)
while it writes; the kernel drops it when the process ends, however it ends (a SIGKILLed run leaves
no stale lock). A run that meets a claimed default folder takes the next free `<folder>-2`, `-3`,
... and says so; a folder the user named with `--out` is never swapped for another: that is an
error naming the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flowspec.config import ScenarioError

LOCK_NAME = ".flowspec.lock"
MAX_SIBLINGS = 100  # runs/<name>-2 .. -100: more concurrent runs of one scenario is a runaway script


@contextmanager
def claimed(folder: Path, *, chosen: bool, echo: Callable[[str], None] = lambda m: None) -> Iterator[Path]:
    """The folder this run writes into, held until the block ends: `folder` itself, or when another
    run holds it and `chosen` is False (the default folder), its first free sibling."""
    candidates = [folder] if chosen else [folder, *(folder.with_name(f"{folder.name}-{i}") for i in range(2, MAX_SIBLINGS + 1))]
    for candidate in candidates:
        handle = _try_lock(candidate)
        if handle is None:
            continue
        if candidate != folder:
            echo(f"{folder} is being written by another run; writing into {candidate} instead")
        try:
            yield candidate
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    holder = _holder(folder)
    raise ScenarioError(f"{folder}: another run (pid {holder}) is writing there; wait for it or choose another --out"
                        if chosen else f"{folder} and its {MAX_SIBLINGS - 1} siblings are all being written by other runs")


def _try_lock(folder: Path):  # -> an open file holding the lock, or None when another process holds it
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _holder(folder: Path) -> str:
    try:
        return (folder / LOCK_NAME).read_text().strip() or "?"
    except OSError:
        return "?"
