"""Shared bits of the benchmark scripts (run by `make bench`, never collected by pytest)."""

from __future__ import annotations

import gzip
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
TAOBAO = DATA / "taobao_userbehavior" / "UserBehavior_head_84k.csv.gz"
#: Time-ordered stream slice: 66k users with 1-20 events each (short histories).
FLINK = DATA / "taobao_userbehavior" / "UserBehavior_flink_course_slice_110k.csv.gz"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def replicated_taobao(out: Path, target_rows: int) -> int:
    """Write the Taobao sample replicated with fresh user ids until ``target_rows`` rows."""
    with gzip.open(TAOBAO, "rt") as f:
        lines = [ln for ln in f.read().splitlines() if ln.count(",") == 4]
    rows = 0
    with out.open("w") as f:
        rep = 0
        while rows < target_rows:
            for ln in lines:
                user, rest = ln.split(",", 1)
                f.write(f"{int(user) + rep * 10_000_000},{rest}\n")
            rows += len(lines)
            rep += 1
    return rows
