"""Turn a saved pytest-benchmark JSON into ``benchmarks/RESULTS.md`` (tables, targets) and a PNG chart.

    pytest benchmarks --benchmark-only --full-sizes --benchmark-json=benchmarks/results.json
    python -m benchmarks.report benchmarks/results.json

One table per benchmark group (operation, mode, device, size): median time and its spread (IQR)
over the rounds, speed-up over plain PyTorch (the row of kind "baseline"), added peak memory and
how much less that is than plain PyTorch's. Then the project's performance targets, each met, missed or not
measured, with the numbers behind it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1e6  # as harness.MB; not imported, so the report needs neither torch nor snca_ext
DEFAULT_JSON = HERE / "results.json"
DEFAULT_OUTPUT = HERE / "RESULTS.md"
# Sections written by hand or by other scripts, kept (from the first of them to the end) when the
# CPU report is regenerated.
KEPT_SECTIONS = ("## Measured on a GPU", "## Static report of the GPU kernels")
IMAGENET_ROWS, CIFAR_ROWS = 1_281_167, 50_000
OURS_CPU = "snca_ext-cpu"
_OP_ORDER = {"snca_loss": 0, "bank_topk": 1}
_MODE_ORDER = {"forward": 0, "forward+backward": 1}


@dataclass(frozen=True)
class Row:
    group: str
    op: str
    mode: str
    device: str
    bank_rows: int
    impl: str
    label: str
    kind: str
    median: float
    iqr: float
    rounds: int
    memory: int | None  # added peak memory in bytes


@dataclass(frozen=True)
class Target:
    claim: str
    status: str  # "met", "MISSED", "not measured"
    detail: str


def load_rows(data: dict) -> list[Row]:
    rows = []
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench["stats"]
        rows.append(
            Row(
                group=bench.get("group") or bench["name"],
                op=str(info.get("op", "")),
                mode=str(info.get("mode", "")),
                device=str(info.get("device", "")),
                bank_rows=int(info.get("N", 0)),
                impl=str(info.get("impl", bench["name"])),
                label=str(info.get("label", bench["name"])),
                kind=str(info.get("kind", "")),
                median=float(stats["median"]),
                iqr=float(stats["iqr"]),
                rounds=int(stats["rounds"]),
                memory=info.get("added_memory_bytes"),
            )
        )
    return rows


def _group_key(rows: list[Row]) -> tuple:
    first = rows[0]
    return (
        _OP_ORDER.get(first.op, 9),
        _MODE_ORDER.get(first.mode, 9),
        first.device != "cpu",
        first.bank_rows,
        first.group,
    )


def grouped(rows: Sequence[Row]) -> list[list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return [sorted(g, key=lambda r: r.median) for g in sorted(groups.values(), key=_group_key)]


def baseline(group: Sequence[Row]) -> Row | None:
    return next((row for row in group if row.kind == "baseline"), None)


# ----------------------------------------------------------------------------- formatting


def fmt_date(stamp: str | None) -> str:
    if not stamp:
        return "(date unknown)"
    moment = datetime.fromisoformat(stamp)
    return moment.strftime("%Y-%m-%d %H:%M") + (" UTC" if moment.utcoffset() == timedelta(0) else "")


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_memory(nbytes: int | None) -> str:
    if nbytes is None:
        return "n/a"
    if nbytes >= 1000 * MB:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / MB:.1f} MB" if nbytes >= 10 * MB else f"{nbytes / MB:.2f} MB"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    if math.isinf(ratio) or ratio >= 1000:
        return "> 1000x"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def fmt_memory_saving(saving: float | None) -> str:
    if saving is None:
        return "n/a"
    if saving >= 1:
        return fmt_ratio(saving) + " less"
    return fmt_ratio(1 / saving) + " more"


def speedup(row: Row, base: Row | None) -> float | None:
    return None if base is None else base.median / row.median


def memory_saving(row: Row, base: Row | None) -> float | None:
    """How many times less added memory than the baseline (inf when ``row`` added none)."""
    if base is None or row.memory is None or base.memory is None:
        return None
    return math.inf if row.memory <= 0 else base.memory / row.memory


# ----------------------------------------------------------------------------- targets


def _find(rows: Sequence[Row], op: str, mode: str, bank_rows: int) -> list[Row]:
    return [
        r for r in rows if r.op == op and r.mode == mode and r.device == "cpu" and r.bank_rows == bank_rows
    ]


def _check(claim: str, ok: bool, detail: str) -> Target:
    return Target(claim, "met" if ok else "MISSED", detail)


def targets(rows: Sequence[Row]) -> list[Target]:
    """The performance targets of the fused CPU op, each judged from the measured rows."""
    found = []
    for bank_rows, factor in ((CIFAR_ROWS, 3.0), (IMAGENET_ROWS, 5.0)):
        for mode in ("forward", "forward+backward"):
            where = f"SNCA loss {mode}, N = {bank_rows:,}"
            group = _find(rows, "snca_loss", mode, bank_rows)
            ours = next((r for r in group if r.impl == OURS_CPU), None)
            base = baseline(group)
            others = [r for r in group if r.kind != "ours"]
            if ours is None or base is None:
                claim = f"{where}: fused CPU op ahead of every peer, >= {factor:g}x plain PyTorch"
                found.append(Target(claim, "not measured", "run the full sizes (--full-sizes)"))
                continue
            fastest = min(others, key=lambda r: r.median)
            found.append(
                _check(
                    f"{where}: fused CPU op faster than every other implementation",
                    ours.median < fastest.median,
                    f"ours {fmt_time(ours.median)}, fastest other {fastest.label} {fmt_time(fastest.median)} "
                    f"({fmt_ratio(fastest.median / ours.median)})",
                )
            )
            measured = [r for r in others if r.memory is not None]
            if ours.memory is not None and measured:
                leanest = min(measured, key=lambda r: r.memory)
                found.append(
                    _check(
                        f"{where}: fused CPU op adds less memory than every other implementation",
                        ours.memory < leanest.memory,
                        f"ours {fmt_memory(ours.memory)}, leanest other {leanest.label} "
                        f"{fmt_memory(leanest.memory)}",
                    )
                )
            ratio = speedup(ours, base)
            found.append(
                _check(
                    f"{where}: >= {factor:g}x faster than plain PyTorch",
                    ratio >= factor,
                    f"{fmt_ratio(ratio)} ({fmt_time(ours.median)} vs {fmt_time(base.median)})",
                )
            )
            if bank_rows == IMAGENET_ROWS and ours.memory is not None:
                found.append(
                    _check(
                        f"{where}: fused CPU op adds < 100 MB",
                        ours.memory < 100 * MB,
                        f"{fmt_memory(ours.memory)} (plain PyTorch {fmt_memory(base.memory)})",
                    )
                )
    found.extend(_topk_targets(rows))
    return found


def _topk_targets(rows: Sequence[Row]) -> list[Target]:
    where = f"bank_topk k = 30, N = {IMAGENET_ROWS:,}"
    group = _find(rows, "bank_topk", "k=30", IMAGENET_ROWS)
    ours = next((r for r in group if r.impl == OURS_CPU), None)
    if ours is None:
        return [Target(f"{where}: faster than faiss, >= 3x torch.topk", "not measured", "run the full sizes")]
    found = []
    faiss = next((r for r in group if r.impl == "faiss-flatip"), None)
    if faiss is None:
        found.append(Target(f"{where}: faster than faiss IndexFlatIP", "not measured", "faiss-cpu missing"))
    else:
        found.append(
            _check(
                f"{where}: faster than tuned faiss-cpu IndexFlatIP",
                ours.median < faiss.median,
                f"ours {fmt_time(ours.median)}, faiss {fmt_time(faiss.median)} "
                f"({fmt_ratio(faiss.median / ours.median)})",
            )
        )
    base = baseline(group)
    if base is not None:
        ratio = speedup(ours, base)
        found.append(
            _check(
                f"{where}: >= 3x faster than torch.topk on the materialised matrix",
                ratio >= 3.0,
                f"{fmt_ratio(ratio)} ({fmt_time(ours.median)} vs {fmt_time(base.median)})",
            )
        )
    return found


# ----------------------------------------------------------------------------- output


def machine_line(data: dict) -> str:
    machine = data.get("machine_info", {})
    ours = machine.get("snca_ext", {})
    cpu = machine.get("cpu", {})
    parts = [
        f"{cpu.get('brand_raw') or machine.get('processor') or machine.get('machine', '?')}",
        f"{ours.get('cpu_count') or cpu.get('count', '?')} cores",
    ]
    if ours.get("memory_gb"):
        parts.append(f"{ours['memory_gb']} GB RAM")
    if ours.get("gpu"):
        parts.append(f"GPU {ours['gpu']}")
    parts.append(f"{machine.get('system', '')} {machine.get('release', '')}".strip())
    parts.append(f"Python {machine.get('python_version', '?')}")
    if ours.get("torch"):
        parts.append(f"torch {ours['torch']} ({ours.get('torch_threads')} threads)")
    peers = ", ".join(f"{name} {version}" for name, version in (ours.get("peers") or {}).items() if version)
    if peers:
        parts.append(f"peers: {peers}")
    return "; ".join(parts)


def group_table(group: Sequence[Row]) -> list[str]:
    base = baseline(group)
    lines = [
        "| Implementation | Median time | IQR | Rounds | Speed-up vs plain PyTorch | Added peak memory "
        "| Memory vs plain PyTorch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in group:
        name = f"**{row.label}**" if row.kind == "ours" else row.label
        lines.append(
            f"| {name} | {fmt_time(row.median)} | {fmt_time(row.iqr)} | {row.rounds} "
            f"| {fmt_ratio(speedup(row, base))} | {fmt_memory(row.memory)} "
            f"| {fmt_memory_saving(memory_saving(row, base))} |"
        )
    return lines


def render_markdown(data: dict, rows: Sequence[Row], source: str, chart: str | None) -> str:
    sizes = data.get("machine_info", {}).get("snca_ext", {}).get("sizes", "?")
    lines = [
        "# Benchmark results",
        "",
        f"Measured {fmt_date(data.get('datetime'))} on: {machine_line(data)}.",
        "",
        f"Sizes: `{sizes}`. Source: `{source}`, written by `python -m benchmarks.report`; rerun with",
        "`pytest benchmarks --benchmark-only --full-sizes --benchmark-json=benchmarks/results.json`",
        "then `python -m benchmarks.report benchmarks/results.json`.",
        "",
        "Time: median over the rounds (IQR = spread between the quartiles). Speed-up: plain PyTorch's",
        "median over this row's. Added peak memory: peak RSS during one call minus RSS just before it,",
        "with the inputs already allocated (on CPU; `max_memory_allocated` growth on GPU).",
        "",
        "## Targets",
        "",
        "| Target | Status | Measured |",
        "|---|---|---|",
    ]
    for target in targets(rows):
        status = "**MISSED**" if target.status == "MISSED" else target.status
        lines.append(f"| {target.claim} | {status} | {target.detail} |")
    missed = [t for t in targets(rows) if t.status == "MISSED"]
    lines += ["", f"{len(missed)} target(s) missed." if missed else "No measured target was missed.", ""]
    if chart:
        lines += [f"![time and memory per implementation]({chart})", ""]
    for group in grouped(rows):
        lines += [f"## {group[0].group}", "", *group_table(group), ""]
    lines += [
        "## Notes",
        "",
        "- pytorch-metric-learning's `NCALoss` gets the bank as `ref_emb` and `softmax_scale = 1 / (2T)`",
        "  (its squared L2 distance of unit vectors is `2 - 2<f, m>`); it cannot leave out a query's own",
        "  bank row, so its loss is checked against ours with no row left out.",
        "- faiss `IndexFlatIP` is tuned per size as a user who knows it would: its BLAS path",
        "  (`faiss.cvar.distance_compute_blas_threshold = 20`; its default keeps B = 256 on a slow SIMD",
        "  loop) or the SIMD loop, and 1 or all threads, whichever one untimed search finds fastest (the",
        "  `faiss_tuning` entry of the JSON). Building the index (a copy of the bank) is not timed.",
        "- Every peer's loss (and gradient) or neighbours were checked against `snca_ext` before timing.",
        "",
    ]
    return "\n".join(lines)


def render_chart(rows: Sequence[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import NullFormatter

    groups = grouped(rows)
    fig, axes = plt.subplots(
        len(groups), 2, figsize=(13, 0.45 * len(rows) + 1.2 * len(groups)), squeeze=False
    )
    for (time_ax, memory_ax), group in zip(axes, groups, strict=True):
        labels = [row.label for row in group]
        colours = ["tab:orange" if row.kind == "ours" else "tab:blue" for row in group]
        panels = (
            (
                time_ax,
                [row.median for row in group],
                [fmt_time(row.median) for row in group],
                "median time (s)",
            ),
            (
                memory_ax,
                # a log axis has no zero: a call that added nothing is drawn at 1 KB
                [max(row.memory or 0, 1000) / MB for row in group],
                [fmt_memory(row.memory) for row in group],
                "added peak memory (MB)",
            ),
        )
        for ax, values, texts, xlabel in panels:
            bars = ax.barh(labels, values, color=colours)
            ax.bar_label(bars, texts, padding=3, fontsize=8)
            ax.set_xscale("log")
            ax.set_xlim(min(values) / 3, max(values) * 8)  # room for the labels
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel + ", log scale", fontsize=9)
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=8)
        time_ax.set_title(group[0].group, fontsize=9, loc="left")
        memory_ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON, help="pytest-benchmark JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="markdown file to write")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (written next to --output)")
    args = parser.parse_args(argv)

    data = json.loads(args.json.read_text())
    rows = load_rows(data)
    if not rows:
        print(
            f"{args.json} holds no benchmark results (was it run with --benchmark-disable?)", file=sys.stderr
        )
        return 1
    chart = None
    if not args.no_chart:
        chart_path = args.output.with_suffix(".png")
        render_chart(rows, chart_path)
        chart = chart_path.name
    text = render_markdown(data, rows, args.json.name, chart)
    # Sections written by other commands (the static report of the GPU kernels) are kept.
    old = args.output.read_text() if args.output.is_file() else ""
    kept_at = [old.index(heading) for heading in KEPT_SECTIONS if heading in old]
    if kept_at:
        text = text.rstrip("\n") + "\n\n" + old[min(kept_at) :]
    args.output.write_text(text)
    missed = sum(t.status == "MISSED" for t in targets(rows))
    print(f"wrote {args.output}" + (f" and {chart}" if chart else "") + f"; {missed} target(s) missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
