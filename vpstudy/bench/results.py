"""What every benchmark result JSON starts with, and how it is written (``bench/results/``)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..provenance import package_versions


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def result_header(module: str, argv: Sequence[str] | None, load_before: list[float] | None,
                  load_after: list[float] | None) -> dict[str, Any]:  # fmt: skip
    """Benchmark name, UTC date, the exact command, the CPU device (with the load average before
    and after) and package versions."""
    command = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
    return {
        "benchmark": module,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "device": {"type": "cpu", "name": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "load_average_before": load_before, "load_average_after": load_after},  # fmt: skip
        "versions": package_versions(),
    }


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` (if given) and say so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
