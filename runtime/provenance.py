"""Which machine and which checkout produced a measurement: what every profile card records.

A profile belongs to the board it was measured on (DESIGN §8), so the device and link profilers
write the CPU model and the git revision into their cards. Both helpers are cheap, import nothing
heavy, and never fail: an unknown answer is recorded as such.
"""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's model name (Linux), sysctl's brand string (macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:  # macOS
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5,
                             check=False)  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_revision() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of this checkout, or (None, None)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here,
                             timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None, None
    return sha, bool(dirty)
