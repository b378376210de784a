"""The GPU-check scripts (gpu_checks/gpu_check.sh and its Python drivers) work before a GPU comes:
they import, print their help, and their CPU-checkable parts compute what they claim."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from gpu_checks import edge_shapes, tc_rounding_probe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [edge_shapes, tc_rounding_probe])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_the_probe_statistic_tells_rz_from_rn():
    exact = torch.rand(20000, dtype=torch.float64) * 100 - 50
    nearest = exact.float()
    toward_zero = torch.where(
        nearest.double().abs() > exact.abs(), torch.nextafter(nearest, torch.zeros_like(nearest)), nearest
    )
    rn_mean, _ = tc_rounding_probe.signed_error_ulps(nearest, exact)
    rz_mean, _ = tc_rounding_probe.signed_error_ulps(toward_zero, exact)
    assert abs(rn_mean) < 0.02
    assert -0.6 < rz_mean < -0.4  # half an ulp lost on average


def test_edge_shapes_agree_on_the_cpu(capsys):
    backend = "cpu" if "cpu" in __import__("snca_ext").available_backends("cpu") else "reference"
    assert edge_shapes.main(["--backend", backend, "--device", "cpu", "--finite-only"]) == 0
    assert "15/15 cases agree" in capsys.readouterr().out


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "gpu_checks" / "gpu_check.sh")], check=True)
