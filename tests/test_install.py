"""Installing the package: from its sdist into a fresh folder, and without its compiled part."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import snca_ext

ROOT = Path(__file__).resolve().parents[1]

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


INSTALLED_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    import snca_ext
    from snca_ext import reference

    assert snca_ext.__file__.startswith(sys.argv[1]), snca_ext.__file__
    assert "cpu" in snca_ext.available_backends("cpu"), snca_ext.backends.C_IMPORT_ERROR
    f = torch.nn.functional.normalize(torch.randn(5, 7, dtype=torch.float64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(600, 7, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (600,))
    ours = snca_ext.snca_loss(f, torch.arange(5), bank, labels, 0.1, backend="cpu")
    want = reference.snca_loss_reference(f, torch.arange(5), bank, labels, 0.1)
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)
    print("installed cpu backend ok")
    """
)


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_sdist_carries_every_source_and_installs(tmp_path):
    """The sdist holds every file under csrc/ (a header the build does not name would otherwise be
    left out, and only a build from the sdist would notice), then builds and installs offline into
    a fresh folder, where the cpu backend loads and matches the reference. About a minute: the
    CPU kernels are compiled."""
    dist, egg = tmp_path / "dist", tmp_path / "egg"
    egg.mkdir()
    # egg_info in a temporary folder keeps the checkout clean.
    _run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(egg),
            "sdist",
            "--dist-dir",
            str(dist),
        ],
        cwd=ROOT,
        env={**os.environ, "SNCA_EXT_BUILD_CUDA": "0"},
        timeout=300,
    )
    (sdist,) = dist.glob("snca_ext-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "csrc").rglob("*")
        if path.suffix in (".cpp", ".h", ".cu", ".cuh")
    }
    assert sources and sources <= names, f"missing from the sdist: {sorted(sources - names)}"
    assert not any(name.endswith((".so", ".o")) for name in names), sorted(names)

    target = tmp_path / "site"
    env = {**os.environ, "SNCA_EXT_BUILD_CUDA": "0", "MAX_JOBS": "2"}
    env.pop("PYTHONPATH", None)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(sdist),
        ],
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    env["PYTHONPATH"] = str(target)
    result = _run([sys.executable, "-c", INSTALLED_CHILD, str(target)], cwd=tmp_path, env=env, timeout=120)
    assert "installed cpu backend ok" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_available_backends_on_a_missing_gpu_lists_nothing():
    # Without a driver, asking about "cuda" must answer, not raise torch's "Found no NVIDIA driver".
    assert snca_ext.available_backends("cuda") == []
    assert snca_ext.available_backends(torch.device("cuda", 3)) == []
    assert "reference" in snca_ext.available_backends("cpu")
