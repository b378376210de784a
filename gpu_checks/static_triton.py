"""Static report of the Triton kernel, without a GPU: every configuration the launcher can choose
(snca_ext.triton.configs.launch_configs), compiled ahead of time for sm_80, sm_86, sm_89 and
sm_90, with its registers, spills and shared memory (from the cubin) and the warp-instructions
and tensor-core MMAs of one bank tile (from the SASS of the main loop): which MMA instructions,
and how many multiply-adds they issue per product the tile needs (1 when every product is one
MMA product: tf32, 16-bit, fp64; 3 or 2 for split fp32; 0 would mean FMAs).

    python -m gpu_checks.static_triton                    # the markdown table (all configurations)
    python -m gpu_checks.static_triton --default          # only the D = 128 configurations
    python -m gpu_checks.static_triton --precision 16bit  # only the bf16/fp16-feature ones

Compiling every configuration for four targets takes a few minutes; Triton's cache makes a second
run fast. ``triton_static_rows()`` returns the rows for other reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from snca_ext.triton import configs as triton_configs
from snca_ext.triton import kernel as triton_kernel

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) of each target.
SHARED_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
ROW_KEYS = (
    "kernel",
    "config",
    "target",
    "registers",
    "spills_bytes",
    "shared_bytes",
    "warp_instructions_per_tile",
    "mma_per_tile",
    "mma_kinds",
    "mma_macs_per_product",
)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_POINTER_TYPES = {"fp32": "*fp32", "fp64": "*fp64", "bf16": "*bf16", "fp16": "*fp16"}
# Tensor-core instructions: mma.sync (HMMA, DMMA for fp64) and Hopper's warpgroup MMA (HGMMA).
_MMA = re.compile(r"\b(HMMA|HGMMA|DMMA)\b")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_EXIT = re.compile(r"EXIT\b")  # unpredicated (a predicated one reads "@P0 EXIT")
# An MMA opcode and its shape: HMMA.16816 (m16n8k16), HMMA.1688, DMMA.884, HGMMA.64x32x16.
_MMA_SHAPE = re.compile(r"\b(HMMA|DMMA)\.(16|8)(8)(16|8|4)\b|\bHGMMA\.(\d+)x(\d+)x(\d+)\b")


def _signature(config: triton_configs.KernelConfig) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of the kernel as the launcher calls it on contiguous
    tensors: unit inner strides (Triton specialises 1) and 16-aligned pointers and row strides."""
    kernel = triton_kernel._snca_partials_kernel
    features = _POINTER_TYPES[config.features]
    # Outputs and 1 / T in the accumulation dtype: fp32 for 16-bit features.
    accumulated = "*fp64" if config.features == "fp64" else "*fp32"
    key = "*i64" if config.features == "fp64" else "*i32"
    pointers = {
        "features_ptr": features,
        "labels_ptr": "*i64",
        "own_rows_ptr": "*i64",
        "bank_ptr": _POINTER_TYPES[config.bank],
        "bank_labels_ptr": "*i64",
        "cursor_keys_ptr": key,
        "cursor_rows_ptr": "*i32",
        "top_rows_ptr": "*i32",
    }
    constexprs = {"stride_fd": 1, "stride_md": 1, **config.constexprs()}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, accumulated)
        else:
            signature[name] = "i32"
    # The launch of interest: D = BLOCK_D and B a multiple of 16 (B = 256), which Triton
    # specialises as divisible by 16, as it does 16-aligned pointers and row strides.
    aligned = {name for name in kernel.arg_names if name.endswith("_ptr")}
    aligned |= {"stride_fb", "stride_mn", "dim", "num_queries"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in aligned}
    return signature, constexprs, attrs


def compile_config(config: triton_configs.KernelConfig, arch: int):
    """The kernel compiled ahead of time for sm_<arch> (no device needed)."""
    signature, constexprs, attrs = _signature(config)
    source = triton.compiler.ASTSource(
        fn=triton_kernel._snca_partials_kernel, signature=signature, constexprs=constexprs, attrs=attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=config.launch_options())


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run(
            [_CUOBJDUMP, *flags, file.name], check=True, capture_output=True, text=True
        ).stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread). A Triton kernel holds no local arrays, so
    every stack byte is a spill slot."""
    usage = re.search(r"REG:(\d+) STACK:(\d+)", _cuobjdump(cubin, "-res-usage"))
    if usage is None:
        raise RuntimeError("cuobjdump -res-usage printed no REG/STACK line")
    return int(usage.group(1)), int(usage.group(2))


def main_loop(sass: str) -> list[str]:
    """The instructions of one warp in one pass of the main loop: the outermost backward branch
    whose body holds tensor-core MMAs (an inner loop, the top-k insertion, counts once).

    A span that holds an unconditional EXIT is no loop: ptxas lays the divergent-warp copies of
    the code around warp shuffles (the targets of ``BRA.DIV``, each SHFL a CALL) after the
    kernel's EXIT, each ending in a branch back into the main body. Such a branch looks
    backward, and its span (the loop's tail, the epilogue, the EXIT and the copies, whose MMAs
    are a copy's) outgrew the tile loop on sm_80: half the MMAs were counted."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for address, text in instructions:
        branch = _BRANCH.search(text)
        if branch and int(branch.group(1), 16) <= address:
            begin = int(branch.group(1), 16)
            body = [op for at, op in instructions if begin <= at <= address]
            if any(_MMA.search(op) for op in body) and not any(_EXIT.match(op) for op in body):
                loops.append(body)
    return max(loops, key=len, default=[])


def main_loop_counts(sass: str) -> tuple[int, int]:
    """(instructions, MMAs) of one warp in one pass of the main loop."""
    body = main_loop(sass)
    return len(body), sum(1 for op in body if _MMA.search(op))


def mma_macs(body: list[str], num_warps: int) -> int:
    """Multiply-adds the MMAs of a loop body issue per pass of the whole program: an HMMA or DMMA
    is one warp's (m x n x k), an HGMMA one warpgroup's (4 warps issue it together)."""
    macs = 0
    for op in body:
        shape = _MMA_SHAPE.search(op)
        if shape is None:
            continue
        if shape.group(1):
            m, n, k = (int(shape.group(i)) for i in (2, 3, 4))
            macs += m * n * k * num_warps
        else:
            m, n, k = (int(shape.group(i)) for i in (5, 6, 7))
            macs += m * n * k * num_warps // 4
    return macs


def tile_products(config: triton_configs.KernelConfig) -> int:
    """Products one tile needs: the [BLOCK_B, BLOCK_N] scores over the padded D, and with the
    gradient the two weighted sums over this program's columns."""
    scores = config.block_b * config.block_n * config.block_d
    if not config.with_grad:
        return scores
    return scores + 2 * config.block_b * config.block_n * (config.grad_d or config.block_d)


def static_row(config: triton_configs.KernelConfig, arch: int) -> dict:
    compiled = compile_config(config, arch)
    registers, spills = resource_usage(compiled.asm["cubin"])
    body = main_loop(_cuobjdump(compiled.asm["cubin"], "-sass"))
    instructions = len(body)
    mmas = [op.split()[0] for op in body if _MMA.search(op)]
    return {
        "kernel": "_snca_partials_kernel",
        "config": config.name,
        "target": f"sm_{arch}",
        "registers": registers,
        "spills_bytes": spills,
        "shared_bytes": compiled.metadata.shared,
        # Every warp of the program runs the loop body once per tile.
        "warp_instructions_per_tile": instructions * config.num_warps if instructions else None,
        "mma_per_tile": len(mmas) * config.num_warps if mmas else None,
        "mma_kinds": " ".join(sorted(set(mmas))) or None,
        "mma_macs_per_product": round(mma_macs(body, config.num_warps) / tile_products(config), 3),
    }


def _static_row(job: tuple[triton_configs.KernelConfig, int]) -> dict:
    return static_row(*job)


def triton_static_rows(
    configs: Iterable[triton_configs.KernelConfig] | None = None,
    archs: Iterable[int] = tuple(SHARED_LIMITS),
    jobs: int = 1,
) -> list[dict]:
    """One row per (configuration, target); by default every configuration the launcher can
    choose, for sm_80, sm_86, sm_89 and sm_90. ``jobs`` > 1 compiles in that many processes."""
    configs = triton_configs.launch_configs() if configs is None else list(configs)
    archs = list(archs)
    if not isinstance(triton_kernel._snca_partials_kernel, JITFunction):
        return _rows_in_subprocess(configs, archs, jobs)
    # A configuration for one target only (Hopper's warpgroup-MMA tiles) is compiled for it alone.
    work = [(config, arch) for config in configs for arch in archs if config.arch in (0, arch)]
    if jobs <= 1:
        return [static_row(*job) for job in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_static_row, work))


def _rows_in_subprocess(
    configs: list[triton_configs.KernelConfig], archs: list[int], jobs: int
) -> list[dict]:
    """Under TRITON_INTERPRET=1 (set before triton was imported, as the CPU test suite does) the
    kernels are interpreted functions, which do not compile: a fresh process without it does."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    request = json.dumps({"configs": [dataclasses.asdict(c) for c in configs], "archs": archs, "jobs": jobs})
    done = subprocess.run(
        [sys.executable, "-m", "gpu_checks.static_triton", "--json"],
        input=request,
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"compiling the Triton kernel failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def fits(row: dict) -> bool:
    """No spill, and the shared memory within the target's opt-in limit."""
    return row["spills_bytes"] == 0 and row["shared_bytes"] <= SHARED_LIMITS[int(row["target"][3:])]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(ROW_KEYS) + " | fits |", "|" + "---|" * (len(ROW_KEYS) + 1)]
    for row in rows:
        cells = ["-" if row[key] is None else str(row[key]) for key in ROW_KEYS]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if fits(row) else 'NO'} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Per target: how many configurations, the most registers, how many spill, the largest
    shared memory against the opt-in limit, and how many do not fit."""
    lines = [
        "| target | configurations | most registers | spilling | largest shared memory (opt-in) "
        "| not fitting |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for target in sorted({row["target"] for row in rows}, key=lambda name: int(name[3:])):
        mine = [row for row in rows if row["target"] == target]
        largest = max(row["shared_bytes"] for row in mine)
        limit = SHARED_LIMITS[int(target[3:])]
        lines.append(
            f"| {target} | {len(mine)} | {max(row['registers'] for row in mine)} | "
            f"{sum(row['spills_bytes'] > 0 for row in mine)} | {largest:,} ({limit:,}) | "
            f"{sum(not fits(row) for row in mine)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--default", action="store_true", help="only the D = 128 configurations")
    parser.add_argument(
        "--precision",
        choices=("split", "tf32", "16bit", "ieee"),
        help="only the configurations of this precision",
    )
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMITS), help="repeatable")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # stdin -> stdout rows
    args = parser.parse_args()
    if args.json:
        request = json.loads(sys.stdin.read())
        configs = [triton_configs.KernelConfig(**config) for config in request["configs"]]
        print(json.dumps(triton_static_rows(configs, request["archs"], request["jobs"])))
        return
    configs = triton_configs.launch_configs()
    if args.default:
        configs = [config for config in configs if config.block_d == 128]
    if args.precision:
        configs = [config for config in configs if config.precision == args.precision]
    rows = triton_static_rows(configs, args.arch or tuple(SHARED_LIMITS), jobs=args.jobs)
    print(summary(rows) + "\n")
    print(markdown(rows))
    bad = [row for row in rows if not fits(row)]
    print(f"\n{len(rows)} rows; {len(bad)} spill or exceed the opt-in shared memory")


if __name__ == "__main__":
    main()
