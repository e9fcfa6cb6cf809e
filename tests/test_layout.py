"""One sub-package per process: the LB node loads no SPOP or server-node module,
and the server node's lease module loads no LB-node module.

Each check imports in a fresh interpreter, so what other tests imported does
not count."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def loaded_by(module: str) -> list[str]:
    """The spoa.* modules a fresh interpreter holds after `import <module>`."""
    code = f"import {module}, sys; print(sorted(m for m in sys.modules if m.startswith('spoa.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return ast.literal_eval(out)


@pytest.mark.parametrize("module,forbidden", [
    ("spoa.lbnode.service", ("spoa.spop", "spoa.servernode")),
    ("spoa.servernode.lease_module", ("spoa.lbnode",)),
])
def test_a_process_does_not_load_the_other(module, forbidden):
    loaded = loaded_by(module)
    assert module in loaded
    wrong = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not wrong, f"import {module} loads {wrong}"
