"""The package without its compiled part: it imports, and says why the C++ backends are missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class HideCompiledPart(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "snca_ext._C":
                raise ImportError("simulated: snca_ext._C was not built")
            return None

    sys.meta_path.insert(0, HideCompiledPart())
    import torch
    import snca_ext

    assert snca_ext.available_backends("cpu")[-1] == "reference", snca_ext.available_backends("cpu")
    assert "cpu" not in snca_ext.available_backends("cpu")
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    labels = torch.randint(0, 3, (30,))
    print("auto", float(snca_ext.snca_loss(f, torch.arange(4), bank, labels, 0.1)))
    try:
        snca_ext.snca_loss(f, torch.arange(4), bank, labels, 0.1, backend="cpu")
    except RuntimeError as error:
        print("error:", error)
    """
)


def test_imports_and_explains_without_the_compiled_extension():
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "auto " in result.stdout
    assert "backend='cpu' needs the compiled extension snca_ext._C" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout
