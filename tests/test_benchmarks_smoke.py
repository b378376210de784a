"""Smoke run of the benchmark suite (benchmarks/) at tiny sizes, and of its report generator.

The suite itself is not a test and is not collected by ``pytest tests``; this only checks that it
still runs end to end and that the report turns its JSON into the expected tables. The
torch.compile and pykeops cases are left out here: each first compiles C++ (10-30 s on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOSS_MODES = ("forward", "forward+backward")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def _report(json_path: Path, output: Path) -> str:
    done = _run(["-m", "benchmarks.report", str(json_path), "--output", str(output)], timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert output.with_suffix(".png").stat().st_size > 0
    return output.read_text()


def _table_labels(markdown: str, heading_start: str) -> list[list[str]]:
    """The first-column labels of every table under a heading that starts with ``heading_start``."""
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = [] if line[3:].startswith(heading_start) else None
            if current is not None:
                tables.append(current)
        elif current is not None and line.startswith("| ") and not line.startswith("| Implementation"):
            current.append(line.split("|")[1].strip().strip("*"))
    return tables


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    json_path = tmp_path_factory.mktemp("bench") / "tiny.json"
    done = _run(
        [
            "-m",
            "pytest",
            "benchmarks",
            "--benchmark-only",
            "--bench-sizes=tiny",
            "-k",
            "not compile and not pykeops",
            "-p",
            "no:cacheprovider",
            "-q",
            f"--benchmark-json={json_path}",
        ],
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(json_path.read_text()), json_path


def test_suite_runs_every_case_at_tiny_sizes(tiny_run):
    data, _ = tiny_run
    cases = {
        (b["extra_info"]["op"], b["extra_info"]["mode"], b["extra_info"]["impl"]) for b in data["benchmarks"]
    }
    expected = {
        ("snca_loss", mode, impl) for mode in LOSS_MODES for impl in ("snca_ext-cpu", "original", "reference")
    }
    expected |= {("bank_topk", "k=5", impl) for impl in ("snca_ext-cpu", "torch-topk")}
    if importlib.util.find_spec("pytorch_metric_learning") is not None:
        expected |= {("snca_loss", mode, "pml-nca") for mode in LOSS_MODES}
    if importlib.util.find_spec("faiss") is not None:
        expected.add(("bank_topk", "k=5", "faiss-flatip"))
    assert expected <= cases, f"missing cases: {sorted(expected - cases)}"
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        assert info["N"] == 2_000 and info["profile"] == "tiny"
        assert bench["stats"]["rounds"] >= 3 and bench["stats"]["median"] > 0
        if sys.platform == "linux":
            assert isinstance(info["added_memory_bytes"], int), info


def test_report_tables_from_a_real_run(tiny_run, tmp_path):
    data, json_path = tiny_run
    markdown = _report(json_path, tmp_path / "RESULTS.md")
    assert "Measured " in markdown and " cores" in markdown
    for mode in LOSS_MODES:
        (labels,) = _table_labels(markdown, f"snca_loss {mode} | cpu")
        expected = {b["extra_info"]["label"] for b in data["benchmarks"] if b["extra_info"]["mode"] == mode}
        assert set(labels) == expected
        assert "snca_ext.snca_loss (fused, cpu)" in labels
        assert "plain PyTorch (original code, linear-space exp)" in labels
    (labels,) = _table_labels(markdown, "bank_topk k=5 | cpu")
    assert {"snca_ext.bank_topk (fused, cpu)", "torch.topk on the materialised B x N matrix"} <= set(labels)
    # at tiny sizes the performance targets are not measured, and the report says so
    assert "| not measured |" in markdown and "MISSED" not in markdown


def test_report_keeps_the_gpu_sections_when_it_rewrites_the_cpu_tables(tiny_run, tmp_path):
    """The GPU figures and the static report are written by hand and by other scripts: regenerating
    the CPU tables must not drop them."""
    _, json_path = tiny_run
    output = tmp_path / "RESULTS.md"
    gpu = "## Measured on a GPU\n\nH200 figures\n\n## Static report of the GPU kernels\n\nstatic figures\n"
    output.write_text("# Benchmark results\n\nold CPU tables\n\n" + gpu)
    markdown = _report(json_path, output)
    assert markdown.endswith(gpu) and "old CPU tables" not in markdown
    assert "snca_loss forward | cpu" in markdown


def _fake_bench(op: str, mode: str, impl: str, kind: str, bank_rows: int, median: float, memory: int) -> dict:
    group = f"{op} {mode} | cpu | B=256 D=128 N={bank_rows}"
    return {
        "group": group,
        "name": f"test_{op}[{impl}-N={bank_rows}-{mode}]",
        "extra_info": {
            "op": op,
            "mode": mode,
            "impl": impl,
            "label": f"label of {impl}",
            "kind": kind,
            "device": "cpu",
            "N": bank_rows,
            "added_memory_bytes": memory,
        },
        "stats": {"median": median, "iqr": median / 10, "rounds": 3},
    }


def test_report_judges_the_targets(tmp_path):
    """Full-size results where the loss targets are met at N = 50,000 and the top-k targets and the
    ImageNet-size loss speed-up are missed: the report must say which."""
    benchmarks = []
    for bank_rows, ours_time in ((50_000, 0.1), (1_281_167, 4.0)):
        for mode in LOSS_MODES:
            benchmarks += [
                _fake_bench("snca_loss", mode, "snca_ext-cpu", "ours", bank_rows, ours_time, 5_000_000),
                _fake_bench("snca_loss", mode, "original", "baseline", bank_rows, 10.0, 8_000_000_000),
                _fake_bench("snca_loss", mode, "pml-nca", "peer", bank_rows, 12.0, 9_000_000_000),
            ]
    benchmarks += [
        _fake_bench("bank_topk", "k=30", "snca_ext-cpu", "ours", 1_281_167, 0.7, 1_000_000),
        _fake_bench("bank_topk", "k=30", "torch-topk", "baseline", 1_281_167, 1.0, 1_400_000_000),
        _fake_bench("bank_topk", "k=30", "faiss-flatip", "peer", 1_281_167, 0.5, 2_000_000),
    ]
    data = {
        "datetime": "2026-01-02T03:04:05+00:00",
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "snca_ext": {"sizes": "full"}},
        "benchmarks": benchmarks,
    }
    json_path = tmp_path / "full.json"
    json_path.write_text(json.dumps(data))
    markdown = _report(json_path, tmp_path / "RESULTS.md")

    assert "Measured 2026-01-02 03:04 UTC on: Test CPU; 2 cores" in markdown
    target_lines = [
        line for line in markdown.splitlines() if line.startswith("| SNCA loss") or "bank_topk k = 30" in line
    ]
    status = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in target_lines}
    for mode in LOSS_MODES:
        assert status[f"SNCA loss {mode}, N = 50,000: >= 3x faster than plain PyTorch"] == "met"
        assert status[f"SNCA loss {mode}, N = 1,281,167: >= 5x faster than plain PyTorch"] == "**MISSED**"
        assert status[f"SNCA loss {mode}, N = 1,281,167: fused CPU op adds < 100 MB"] == "met"
    assert status["bank_topk k = 30, N = 1,281,167: faster than tuned faiss-cpu IndexFlatIP"] == "**MISSED**"
    assert status[
        "bank_topk k = 30, N = 1,281,167: >= 3x faster than torch.topk on the materialised matrix"
    ] == ("**MISSED**")
    assert "4 target(s) missed." in markdown  # 2 loss speed-ups at ImageNet size, 2 top-k, none else
    for bank_rows in (50_000, 1_281_167):
        (labels,) = _table_labels(markdown, f"snca_loss forward | cpu | B=256 D=128 N={bank_rows}")
        assert labels == ["label of snca_ext-cpu", "label of original", "label of pml-nca"]
