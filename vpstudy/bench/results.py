"""What every benchmark result JSON starts with, how it is written (``bench/results/``), and how
the latency results are read back (:func:`load_latency_results`, drawn by
:func:`vpstudy.figures.fig_latency`)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import VpstudyError
from ..provenance import package_versions

if TYPE_CHECKING:
    import pandas as pd

LATENCY_COLUMNS = ("visual_tokens", "method", "prefill_s", "decode_s", "total_s")


class ResultFileError(VpstudyError):
    """A benchmark result file that exists but cannot be used; the message names it."""


def kernel_versions() -> dict[str, str | None]:
    """Versions of the kernel libraries a fast-path timing depends on (None where absent)."""
    out: dict[str, str | None] = {}
    for package in ("triton", "xformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


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


def cpu_device(load_before: list[float] | None = None, load_after: list[float] | None = None) -> dict[str, Any]:
    """The CPU as a result's ``device`` block: model name, logical CPUs, torch threads, and the
    load average before and after the run."""
    return {"type": "cpu", "name": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before, "load_average_after": load_after}  # fmt: skip


def cuda_device(device: torch.device | str = "cuda", load_before: list[float] | None = None,
                load_after: list[float] | None = None) -> dict[str, Any]:  # fmt: skip
    """A CUDA device as a result's ``device`` block: its name, compute capability, memory (bytes)
    and multiprocessors, the CUDA and cuDNN versions torch was built with, and the host's CPU
    fields (:func:`cpu_device`) under ``host``."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    return {
        "type": "cuda",
        "name": props.name,
        "index": index,
        "capability": f"{props.major}.{props.minor}",
        "memory_bytes": int(props.total_memory),
        "multiprocessors": int(props.multi_processor_count),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "device_count": torch.cuda.device_count(),
        "host": cpu_device(load_before, load_after),
    }


def device_block(device: torch.device | str | None, load_before: list[float] | None,
                 load_after: list[float] | None) -> dict[str, Any]:  # fmt: skip
    """:func:`cuda_device` when ``device`` is a CUDA device, else :func:`cpu_device`."""
    if device is not None and torch.device(device).type == "cuda":
        return cuda_device(device, load_before, load_after)
    return cpu_device(load_before, load_after)


def device_kind(block: dict[str, Any]) -> str:
    """A short file-name tag for a device block: ``cpu``, or the CUDA device's name in lower case
    without the vendor (``"NVIDIA H100 80GB HBM3"`` -> ``h100-80gb-hbm3``)."""
    if block.get("type") != "cuda":
        return "cpu"
    words = [w for w in re.split(r"[^a-z0-9]+", str(block.get("name", "")).lower()) if w and w != "nvidia"]
    return "-".join(words) or "cuda"


def result_header(module: str, argv: Sequence[str] | None, load_before: list[float] | None,
                  load_after: list[float] | None, *, device: torch.device | str | None = None,
                  command: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Benchmark name, UTC date, the exact command, the device (:func:`device_block`: the CPU with
    the load average before and after, or the CUDA device the run used) and package versions.

    ``command`` replaces the default ``python -m <module> <argv>`` (e.g. ``vpstudy bench ...``).
    """
    if command is None:
        command = shlex.join([sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)])
    return {
        "benchmark": module,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": device_block(device, load_before, load_after),
        "versions": package_versions(),
    }


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` (if given) and say so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


# -- latency results, read back ------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """One latency benchmark file (see :func:`load_latency_results`).

    Attributes:
        path: the JSON file.
        device: a label of the device it was measured on (:func:`device_label`).
        rows: one row per (visual_tokens, method), repeats reduced to their median: columns
            ``visual_tokens`` (int), ``method``, ``prefill_s``, ``decode_s``, ``total_s`` and,
            where recorded, ``roofline_decode_s`` (seconds).
    """

    path: Path
    device: str
    rows: pd.DataFrame


def device_label(device: Any) -> str:
    """A result's ``device`` (a name, or a block with ``name`` and ``type``) as one label."""
    if isinstance(device, dict):
        return " ".join(str(device[k]) for k in ("name", "type") if device.get(k)) or "unknown device"
    return str(device) if device else "unknown device"


def load_latency_results(bench_dir: str | Path) -> list[LatencyResult]:
    """Every latency result among the ``*.json`` files of ``bench_dir`` (none if it is absent).

    Schema of a latency file (other JSON files, e.g. recording benchmarks, are ignored)::

        {"kind": "latency",
         "device": "NVIDIA H100" | {"name": ..., "type": ...},
         "rows": [{"visual_tokens": 8192,        # visual-context length (int)
                   "method": "dense",            # "dense" or a sparse method's name
                   "prefill_s": 1.2, "decode_s": 8.5, "total_s": 9.7,   # seconds
                   "roofline_decode_s": 3.1},    # optional: ideal decode time, seconds
                  ...]}

    Every ``visual_tokens`` needs a ``dense`` row. Rows sharing (visual_tokens, method) are
    repeats; their median is used.

    Raises:
        ResultFileError: unreadable JSON, or a latency file with missing fields or no dense row.
    """
    import pandas as pd  # the benchmarks themselves do not need pandas

    folder = Path(bench_dir)
    if not folder.is_dir():
        return []
    results = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ResultFileError(f"{path}: cannot be read as JSON ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != "latency":
            continue
        try:
            rows = pd.DataFrame(data.get("rows") or [])
        except (TypeError, ValueError) as e:
            raise ResultFileError(f"{path}: 'rows' is not a list of records ({e})") from None
        missing = [c for c in LATENCY_COLUMNS if c not in rows.columns]
        if rows.empty or missing:
            raise ResultFileError(f"{path}: latency rows need {', '.join(LATENCY_COLUMNS)}"
                                  + (f" (missing: {', '.join(missing)})" if missing else " (no rows)"))  # fmt: skip
        numeric = [c for c in (*LATENCY_COLUMNS[2:], "roofline_decode_s") if c in rows.columns]
        try:
            rows[numeric] = rows[numeric].astype("float64")
        except (TypeError, ValueError) as e:
            raise ResultFileError(f"{path}: non-numeric seconds in the latency rows ({e})") from None
        rows = rows.groupby(["visual_tokens", "method"], sort=False)[numeric].median().reset_index()
        lengths = set(rows["visual_tokens"])
        no_dense = sorted(lengths - set(rows.loc[rows["method"] == "dense", "visual_tokens"]))
        if no_dense:
            raise ResultFileError(f"{path}: no dense row for visual_tokens {no_dense}")
        results.append(LatencyResult(path, device_label(data.get("device")), rows))
    return results
