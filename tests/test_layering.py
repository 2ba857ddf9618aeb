"""The layers import downward only (docs/design.md, "Layers"): the decode path never pulls in the
analysis layer, and the backends never import the pruner."""

from __future__ import annotations

import subprocess
import sys

import pytest

ANALYSIS = ("pandas", "scipy", "vpstudy.runs", "vpstudy.stats", "vpstudy.analysis", "vpstudy.collect")


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["vpstudy.pruning", "vpstudy.backends", "vpstudy.recorder", "vpstudy.rules",
                                    "vpstudy.selection"])  # fmt: skip
def test_the_decode_path_does_not_import_the_analysis_layer(module):
    modules = _imported_after(f"import {module}")
    pulled = sorted(m for m in modules if m.split(".")[0] in ANALYSIS or m.startswith(ANALYSIS))
    assert not pulled, f"importing {module} imports {pulled}"


def test_the_backends_and_kernels_do_not_import_the_pruner():
    modules = _imported_after("import vpstudy.backends, vpstudy.backends.reference, vpstudy.kernels")
    assert "vpstudy.pruning" not in modules


def test_the_package_root_is_lazy():
    modules = _imported_after("import vpstudy")
    assert not {"vpstudy.pruning", "vpstudy.runs", "pandas"} & modules
    import vpstudy

    assert vpstudy.BudgetRule.__module__ == "vpstudy.rules" and callable(vpstudy.open_run)
