"""A stage's resident set after start-up: the library pages only start-up touched are let go.

Why: importing torch runs the static initialisers of thousands of operators spread through
libtorch_cpu.so, and loading a slice runs more code once, so a SmolLM2 stage has 84 MB of
shared-library pages resident when it starts serving, of which its forwards touch about 25 MB
(`bench/stage_memory.py`). On a board those pages are a third of a stage's footprint, and they are
what the kernel would reclaim first under memory pressure anyway: clean pages of files, read back
from the page cache (or the file) when touched again.

`let_go_of_startup_pages` does that reclaim now, once, when the stage has loaded its slice: it
advises MADV_DONTNEED on every read-only mapping of a shared object whose pages are all clean file
pages, so the pages its forwards use fault back in on the first request and the rest stay out. A
mapping that holds a private copy of a page (relocations written into it, a debugger's breakpoint)
is left alone: MADV_DONTNEED would replace that copy with the file's bytes. The model's weights are
mapped too (`runtime.models.mapped_tensor`, safetensors) but are no shared object, so they stay.

Linux only (it reads /proc/self/smaps); elsewhere, or if madvise is refused, nothing changes.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

MADV_DONTNEED = 4  # the same on every Linux architecture
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \S+\s*(.*)$")
_SHARED_OBJECT = re.compile(r"\.so(\.[\d.]+)?$")  # libc.so.6, libtorch_cpu.so, _zmq.abi3.so, libzmq-2f02442c.so.5.2.5


@dataclass(frozen=True, slots=True)
class Mapping:
    """One region of /proc/self/smaps, as far as letting go of it goes."""

    start: int
    end: int
    perms: str  # "r-xp"
    path: str  # "" for anonymous memory, "[heap]", or a file
    rss_kb: int
    private_kb: int  # pages this process wrote to (Anonymous + Private_Dirty): only it holds them

    @property
    def clean_library(self) -> bool:
        """Read-only pages of a shared object that are all the file's own: safe to let go of."""
        return (self.perms[0] == "r" and self.perms[1] == "-" and self.path.startswith("/")
                and _SHARED_OBJECT.search(self.path) is not None and self.private_kb == 0 and self.rss_kb > 0)  # fmt: skip


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of a /proc/PID/smaps text (see proc(5))."""
    out: list[Mapping] = []
    head: tuple[int, int, str, str] | None = None
    fields: dict[str, int] = {}
    for line in [*text.splitlines(), "0-0 ---p 0 0:0 0 [end]"]:
        m = _HEADER.match(line)
        if m is None:
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[key] = int(rest.split()[0])
            continue
        if head is not None:
            private_kb = fields.get("Anonymous", 0) + fields.get("Private_Dirty", 0)
            out.append(Mapping(*head, rss_kb=fields.get("Rss", 0), private_kb=private_kb))
        head = (int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4).strip())
        fields = {}
    return out


def let_go_of_startup_pages() -> int:
    """Drop this process's clean shared-library pages from its resident set; the kB let go of (0 where
    not Linux). The pages it still needs come back on their next touch, from the page cache."""
    smaps = Path("/proc/self/smaps")
    try:
        mappings = parse_smaps(smaps.read_text())
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    dropped_kb = 0
    for m in mappings:
        if m.clean_library and madvise(m.start, m.end - m.start, MADV_DONTNEED) == 0:
            dropped_kb += m.rss_kb  # a refused one (locked, gone since) keeps its pages: nothing is lost
    return dropped_kb
