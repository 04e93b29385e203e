"""A stage lets go of the library pages only its start-up touched, and of nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime.working_set import parse_smaps

SMAPS = """\
55d0c0000000-55d0c0200000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
Rss:                2000 kB
Private_Dirty:      2000 kB
Anonymous:          2000 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0000400000 r-xp 00100000 08:01 42                         /venv/torch/lib/libtorch_cpu.so
Size:               4096 kB
Rss:                1024 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000400000-7f0000410000 r--p 00500000 08:01 42                         /venv/torch/lib/libtorch_cpu.so
Size:                 64 kB
Rss:                  64 kB
Private_Dirty:        64 kB
Anonymous:            64 kB
VmFlags: rd mr mw me ac
7f0000410000-7f0000420000 rw-p 00510000 08:01 42                         /venv/torch/lib/libtorch_cpu.so
Size:                 64 kB
Rss:                  16 kB
Private_Dirty:        16 kB
Anonymous:            16 kB
VmFlags: rd wr mr mw me ac
7f0001000000-7f0002000000 r--p 00000000 08:01 77                         /cache/models/x/model.safetensors
Size:              16384 kB
Rss:               16384 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
7f0003000000-7f0003010000 r-xp 00000000 08:01 91                         /usr/lib/libzmq-2f02442c.so.5.2.5
Size:                 64 kB
Rss:                  32 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0004000000-7f0004010000 r-xp 00000000 08:01 92                         /usr/lib/libgone.so (deleted)
Size:                 64 kB
Rss:                  32 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
"""


def test_only_clean_read_only_pages_of_shared_objects_are_let_go() -> None:
    mappings = parse_smaps(SMAPS)
    assert [(m.perms, m.path.rsplit("/", 1)[-1], m.rss_kb, m.private_kb) for m in mappings] == [
        ("rw-p", "[heap]", 2000, 4000),
        ("r-xp", "libtorch_cpu.so", 1024, 0),
        ("r--p", "libtorch_cpu.so", 64, 128),  # relocations written after load (RELRO): private copies
        ("rw-p", "libtorch_cpu.so", 16, 32),
        ("r--p", "model.safetensors", 16384, 0),  # the weights: mapped, clean, and needed by every forward
        ("r-xp", "libzmq-2f02442c.so.5.2.5", 32, 0),
        ("r-xp", "libgone.so (deleted)", 32, 0),
    ]
    assert mappings[1].start == 0x7F0000000000 and mappings[1].end == 0x7F0000400000
    assert [m.clean_library for m in mappings] == [False, True, False, False, False, True, False]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_letting_go_shrinks_the_resident_set_and_torch_still_computes() -> None:
    """After `import torch` most of its resident code ran once (initialisers); letting go of it must
    shrink VmRSS by tens of MB, and what torch needs next must fault back in and compute right."""
    code = """
import re, torch
from runtime.working_set import let_go_of_startup_pages
def rss_kb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
a = torch.arange(12.0).reshape(3, 4)
before = rss_kb()
dropped = let_go_of_startup_pages()
after = rss_kb()
print(before, after, dropped, (a @ a.T).tolist() == [[14.0, 38.0, 62.0], [38.0, 126.0, 214.0], [62.0, 214.0, 366.0]])
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, dropped, computes = done.stdout.split()
    assert computes == "True"
    assert int(dropped) > 20_000, done.stdout
    assert int(before) - int(after) > 20_000, done.stdout  # kB
