"""How numbers of the statistics are written in plain text (terminal lines, ``report.md``).

Every function takes values as they come out of ``stats.json`` (a float, or None where the
statistic is undefined) and writes ``n/a`` for None.
"""

from __future__ import annotations

from typing import Any


def fmt_num(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def fmt_ci(row: dict[str, Any], name: str, digits: int = 3) -> str:
    """``0.723 [0.702, 0.743]`` from ``name``, ``name_low``, ``name_high`` of a table row."""
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    return f"{fmt_num(row.get(name), digits)} [{fmt_num(low, digits)}, {fmt_num(high, digits)}]"


def fmt_pct(row: dict[str, Any], name: str) -> str:
    """``30.5% [28.6%, 32.4%]`` from a share (0..1) ``name`` and its interval in a table row."""

    def p(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return f"{p(row.get(name))} [{p(row.get(f'{name}_low'))}, {p(row.get(f'{name}_high'))}]"


def fmt_p(value: float | None) -> str:
    """A p-value with three significant digits, ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.3g}"
