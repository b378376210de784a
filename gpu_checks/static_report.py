"""Static report of the GPU kernels: what the compiled code says before it ever runs.

    python -m gpu_checks.static_report                      # nvcc for sm_80, sm_86, sm_89, sm_90
    python -m gpu_checks.static_report --arch 90            # one architecture (about 2 minutes)
    python -m gpu_checks.static_report --cubin-dir DIR      # keep the cubins there, reuse them next time
    python -m gpu_checks.static_report --so                 # the built snca_ext._C (its archs)
    python -m gpu_checks.static_report --so --arch 90 --no-triton   # one arch, CUDA only: seconds
    python -m gpu_checks.static_report --so --profile bf16  # bf16 / bf16 main loop by source line

For every kernel configuration that ``auto`` can choose (tile_config.h through the op
snca_ext::_cuda_tile_config, per architecture's opt-in shared memory) it prints one markdown table:
registers, spills (ptxas -v; with --so, which has no ptxas log, the stack bytes, which spills
would make non-zero), dynamic shared memory and whether it fits each architecture, and for the lse
kernels the warp-instructions and tensor-core MMAs per 64 x 64 tile in their main loop (the
target applies to lse_partial_kernel; lse_topk_partial_kernel, the same pass with the top-k, runs
only where its shared memory fits, else the op makes the top-k a second pass).

Instructions per tile, per warp: the tile loop is the outermost loop of the kernel that holds MMAs
(found from the backward branches of the SASS). An inner loop counts its body times its trip count,
read from the loop's source line (nvdisasm -g, the code is built with -lineinfo): a header
``for (int x = 0; x < LIMIT; x += STEP)`` with LIMIT one of Dp, kCols, kRowsPerWarp (and the
``#pragma unroll N`` above it). An inner loop without such a header runs only on a rare path (the
rescale of the accumulators, a top-k merge) and is left out; the rare straight-line code that
forward branches skip is counted, so the figure is an upper bound of the common path.

For bf16/fp16 features the lse kernels run the 16-bit engine (engine_mma16.cuh, D <= 128); their
top-k, when it is not inside the lse pass, runs the fp32 engine's top-k kernel on upcast queries
(its rows are the fp32 ones). The 16-bit engine's converting load (a bank of another dtype) is a
loop without a trip count, so those rows leave it out: their figure is the common path of a bank
in the features' dtype plus the MMAs.

Estimate (sm_90 rows at D = 128, lse kernel with the gradient): projected milliseconds of
forward+backward at ImageNet size (B = 256, D = 128, N = 1,281,167: 4 query blocks x 20,019 tiles;
the backward only scales the stored gradient) on an H100 SXM and an H200, the largest of
  issue-bound   warp-instructions per tile x 8 warps x tiles x query blocks / (SMs x 4 schedulers x clock)
  bandwidth     bank bytes / HBM bandwidth (the bank read from HBM once: the query blocks of a split
                run side by side and share its tiles through L2)
  tensor-bound  MMAs per tile x 8 warps x tiles x query blocks x flops per MMA / dense peak
                (m16n8k16: 4,096 flops at the bf16/fp16 rate; m16n8k8 TF32: 2,048 at the TF32 rate)
beside the floor of gpu_checks/gpu_table.py on the same device: max(bank bytes / bandwidth,
3 x 2 B N D / dense 16-bit peak). An estimate, not a measurement: the counts are upper bounds of the
common path (the rare straight-line code of forward branches included), and mma.sync is not
Hopper's fastest MMA (wgmma is). A GPU run replaces it (gpu_checks/gpu_table.py).

The Triton kernels' rows come from gpu_checks/static_triton.py (triton_static_rows()) when present.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIN = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}  # cudaDevAttrMaxSharedMemoryPerBlockOptin
BANKS = {"fp32": "f", "bf16": "N3c108BFloat16E", "fp16": "N3c104HalfE"}
# The 16-bit engine's mangled name: Mma16Engine<Dp, features, bank>, the bank a substitution when
# it is the features' dtype.
FEATURES16 = {"bf16": "N3c108BFloat16E", "fp16": "N3c104HalfE"}
BANKS16 = {
    ("bf16", "bf16"): "S4_E",
    ("bf16", "fp16"): "NS3_4HalfEE",
    ("bf16", "fp32"): "fE",
    ("fp16", "fp16"): "S4_E",
    ("fp16", "bf16"): "NS3_8BFloat16EE",
    ("fp16", "fp32"): "fE",
}
# fp32 features / bf16 bank, D = 128 (tensor-core fp32 engine): the issue's target was 3,000; held
# at what its row phase on rows_fast reaches (2,462 on sm_90, 2,417 on sm_80, 2026-12-07) with room
# for compiler noise, so that the previous row phase (2,934) fails tests/test_cuda_static.py.
TARGET_INSTRUCTIONS = 2600
# bf16 features / bf16 bank, D = 128 (16-bit engine): the issue's target was 1,000; held at what
# the row phase of 2026-12-07 reaches (762 on sm_90, 767 on sm_80) with room for compiler noise,
# so that a change that loses it fails tests/test_cuda_static.py.
TARGET_INSTRUCTIONS16 = 850
TARGET_MMA_SHARE16 = 0.25  # its tensor-core instructions' share of the main loop (reported)

# The estimate's devices (published figures). H100 SXM5: 132 SMs; 1.83 GHz is the clock of NVIDIA's
# dense peaks (989 TFLOP/s bf16/fp16 = 132 SMs x 4,096 flops/clock x 1.83 GHz; TF32 495), HBM3
# 3.35 TB/s (H100 datasheet). H200 SXM: the same GH100 (132 SMs, the same peaks), HBM3e 4.8 TB/s
# (H200 datasheet).
DEVICES = {
    "H100": {
        "sms": 132,
        "clock_hz": 1.83e9,
        "hbm_bytes_per_s": 3.35e12,
        "bf16_flops": 989e12,
        "tf32_flops": 495e12,
    },
    "H200": {
        "sms": 132,
        "clock_hz": 1.83e9,
        "hbm_bytes_per_s": 4.8e12,
        "bf16_flops": 989e12,
        "tf32_flops": 495e12,
    },
}
IMAGENET = {"B": 256, "D": 128, "N": 1_281_167}
SCHEDULERS_PER_SM = 4
WARPS_PER_BLOCK = 8
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# tile_config.h: lse_topk_extra_bytes(), the top-k state of the lse kernel with the top-k in the pass
# (lse_topk_partial_kernel, tensor-core engines only; where it does not fit, the op runs the top-k
# as a second pass).
LSE_TOPK_EXTRA = 17_408
LOOP_LIMITS = {"Dp": None, "kCols": 64, "kRowsPerWarp": 8}


def _tool(name: str) -> str:
    """A CUDA binary tool: the toolkit's, else the copy Triton ships."""
    for folder in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin",):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError(f"{name} not found: install the CUDA toolkit (or triton, which ships it)")


# ----------------------------------------------------------------------------- parsing


@dataclass
class PtxasEntry:
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas(text: str) -> dict[tuple[str, int], PtxasEntry]:
    """ptxas -v output -> {(mangled function, sm): registers, stack, spills}."""
    out: dict[tuple[str, int], PtxasEntry] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'", line)
        if m:
            current = (m.group(1), int(m.group(2)))
            out[current] = PtxasEntry()
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current].stack, out[current].spill_stores, out[current].spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current].registers = int(m.group(1))
    return out


@dataclass
class Instruction:
    address: int
    opcode: str
    target: int | None  # branch target
    file: str | None
    line: int | None


@dataclass
class Function:
    name: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_nvdisasm(text: str) -> dict[str, Function]:
    """nvdisasm -g -c output -> functions with their instructions, branch targets, source lines."""
    functions: dict[str, Function] = {}
    labels: dict[tuple[str, str], int] = {}
    waiting: list[str] = []  # labels seen, waiting for the address of the next instruction
    branches: list[tuple[Instruction, tuple[str, str]]] = []
    fn = None
    file = line_no = None
    for raw in text.splitlines():
        stripped = raw.strip()
        m = re.match(r"^\.text\.(\S+):$", stripped)
        if m:
            fn = functions.setdefault(m.group(1), Function(m.group(1)))
            continue
        m = re.search(r'//## File "([^"]+)", line (\d+)', raw)
        if m:
            file, line_no = m.group(1), int(m.group(2))
            continue
        m = re.match(r"^(\.L_x_\d+):", stripped)
        if m:
            waiting.append(m.group(1))
            continue
        m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m and fn is not None:
            address = int(m.group(1), 16)
            for label in waiting:
                labels[(fn.name, label)] = address
            waiting = []
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
            opcode = body.split()[0] if body else ""
            ins = Instruction(address, opcode, None, file, line_no)
            t = re.search(r"`\((\.L_x_\d+)\)", body)
            if opcode.startswith("BRA") and t:
                branches.append((ins, (fn.name, t.group(1))))
            fn.instructions.append(ins)
    for ins, key in branches:
        ins.target = labels.get(key)
    return functions


def parse_cuobjdump_sass(text: str) -> dict[str, Function]:
    """cuobjdump -sass output (no source lines) -> functions; branch targets are addresses."""
    functions: dict[str, Function] = {}
    fn = None
    for raw in text.splitlines():
        m = re.search(r"Function : (\S+)", raw)
        if m:
            fn = functions.setdefault(m.group(1), Function(m.group(1)))
            continue
        m = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", raw)
        if m and fn is not None:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
            opcode = body.split()[0] if body else ""
            t = re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", body)
            fn.instructions.append(
                Instruction(int(m.group(1), 16), opcode, int(t.group(1), 16) if t else None, None, None)
            )
    return functions


def _is_mma(opcode: str) -> bool:
    return opcode.startswith(("HMMA", "IMMA", "DMMA", "HGMMA"))


def _loops(fn: Function) -> list[tuple[int, int, Instruction]]:
    """(first index, last index, branch) of each loop: a branch to an earlier address."""
    index = {ins.address: i for i, ins in enumerate(fn.instructions)}
    loops = []
    for i, ins in enumerate(fn.instructions):
        if ins.target is not None and ins.target <= ins.address and ins.target in index:
            loops.append((index[ins.target], i, ins))
    return loops


def _trips(ins: Instruction, dp: int, sources: dict[str, list[str]]) -> int | None:
    """Trip count of the loop whose backward branch is `ins`, from its source line; None if unknown."""
    if ins.file is None or ins.line is None:
        return None
    lines = sources.get(ins.file)
    if lines is None:
        try:
            lines = Path(ins.file).read_text().splitlines()
        except OSError:
            lines = []
        sources[ins.file] = lines
    if not 0 < ins.line <= len(lines):
        return None
    m = re.search(r"for \(int (\w+) = 0; \1 < (\w+); (?:\1 \+= (\d+)|\+\+\1|\1\+\+)\)", lines[ins.line - 1])
    if not m or m.group(2) not in LOOP_LIMITS:
        return None
    limit = dp if m.group(2) == "Dp" else LOOP_LIMITS[m.group(2)]
    iterations = -(-limit // int(m.group(3) or 1))
    unroll = re.search(r"#pragma unroll\s*(\d*)", lines[ins.line - 2]) if ins.line >= 2 else None
    if unroll is None:
        return iterations
    return -(-iterations // int(unroll.group(1))) if unroll.group(1) else 1


@dataclass
class LoopCount:
    instructions: int  # warp-instructions per tile (per warp) on the common path
    mma: int
    inner_loops: int  # inner loops counted with their trip count
    rare_loops: int  # inner loops left out (no trip count: rare paths)
    unexplained_mma_loops: int = 0  # left-out loops holding MMAs: the source does not match the binary


def _tile_loop_weights(fn: Function, dp: int) -> tuple[int, int, list[int], int, int, int] | None:
    """The outermost loop holding MMAs, (first, last) instruction index, and how many times each
    instruction runs per trip of it (inner loops by their trip count, 0 for the rare ones), with
    the inner loops counted, left out, and left out although they hold MMAs."""
    loops = _loops(fn)
    with_mma = [
        (a, b, ins) for a, b, ins in loops if any(_is_mma(x.opcode) for x in fn.instructions[a : b + 1])
    ]
    if not with_mma:
        return None
    outer = max(with_mma, key=lambda lp: lp[1] - lp[0])
    a0, b0, _ = outer
    weight = [1] * len(fn.instructions)
    counted = rare = unexplained = 0
    sources: dict[str, list[str]] = {}
    inner = sorted(
        (lp for lp in loops if a0 <= lp[0] and lp[1] <= b0 and lp != outer), key=lambda lp: lp[1] - lp[0]
    )
    for a, b, ins in inner:
        trips = _trips(ins, dp, sources)
        if trips is None:
            rare += 1
            factor = 0
            unexplained += any(_is_mma(x.opcode) for x in fn.instructions[a : b + 1])
        else:
            counted += 1
            factor = trips
        for i in range(a, b + 1):
            weight[i] *= factor
    return a0, b0, weight, counted, rare, unexplained


def tile_loop_count(fn: Function, dp: int) -> LoopCount | None:
    """Warp-instructions and MMAs per tile in the outermost loop holding MMAs (see the module doc)."""
    found = _tile_loop_weights(fn, dp)
    if found is None:
        return None
    a0, b0, weight, counted, rare, unexplained = found
    body = list(zip(weight[a0 : b0 + 1], fn.instructions[a0 : b0 + 1], strict=True))
    instructions = sum(w for w, _ in body)
    mma = sum(w for w, ins in body if _is_mma(ins.opcode))
    return LoopCount(instructions, mma, counted, rare, unexplained)


@dataclass
class ProfileLine:
    count: int  # warp-instructions per tile from this source line
    file: str | None
    line: int | None
    opcodes: dict[str, int]  # opcode (without modifiers) -> warp-instructions per tile


def tile_loop_profile(fn: Function, dp: int) -> list[ProfileLine]:
    """The main loop's warp-instructions per tile by source line (nvdisasm -g), most first: where a
    tile's instructions come from, the tool behind RESULTS.md's breakdowns. Their sum is
    tile_loop_count()'s figure; lines the disassembly does not attribute are (None, None)."""
    found = _tile_loop_weights(fn, dp)
    if found is None:
        return []
    a0, b0, weight, *_ = found
    by_line: dict[tuple[str | None, int | None], ProfileLine] = {}
    for w, ins in zip(weight[a0 : b0 + 1], fn.instructions[a0 : b0 + 1], strict=True):
        if not w:
            continue
        entry = by_line.setdefault((ins.file, ins.line), ProfileLine(0, ins.file, ins.line, {}))
        entry.count += w
        op = ins.opcode.split(".")[0]
        entry.opcodes[op] = entry.opcodes.get(op, 0) + w
    return sorted(by_line.values(), key=lambda p: (-p.count, p.file or "", p.line or 0))


# ----------------------------------------------------------------------------- building


def _includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    return [f"-I{p}" for p in include_paths("cuda")] + [
        f"-I{cuda_home / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
    ]


def build_cubins(arch: int, out_dir: Path) -> str:
    """nvcc -cubin of both CUDA sources for sm_<arch>, as setup.py compiles them; ptxas -v text."""
    import torch

    log = []
    for source in ("snca_forward", "bank_topk"):
        cmd = [
            _tool("nvcc"),
            "-std=c++20",
            "-O3",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            f"-arch=sm_{arch}",
            "-cubin",
            "-Xptxas",
            "-v",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=_C",
            *_includes(),
            "-o",
            str(out_dir / f"{source}_sm{arch}.cubin"),
            str(ROOT / "csrc" / "cuda" / f"{source}.cu"),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed for {source} sm_{arch}:\n{result.stderr[-3000:]}")
        log.append(result.stderr)
        (out_dir / f"{source}_sm{arch}.ptxas.txt").write_text(result.stderr)
    return "\n".join(log)


def parse_res_usage(text: str, arch: int) -> dict[tuple[str, int], PtxasEntry]:
    """cuobjdump -res-usage output -> registers, with the stack bytes as the spill figure."""
    out: dict[tuple[str, int], PtxasEntry] = {}
    function = None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            function = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+)", line)
        if m and function:
            reg, stack = map(int, m.groups())
            out[(function, arch)] = PtxasEntry(reg, stack, stack, stack)
    return out


def extract_so(so_path: Path, out_dir: Path) -> list[int]:
    """The cubins of a built library as <source>_sm<arch>.cubin plus a .resusage.txt; their archs."""
    cuobjdump = _tool("cuobjdump")
    subprocess.run([cuobjdump, "-xelf", "all", str(so_path)], cwd=out_dir, check=True, capture_output=True)
    archs = set()
    for cubin in out_dir.glob("*.sm_*.cubin"):
        source, arch = cubin.name.split(".")[0], int(cubin.name.split(".sm_")[1].split(".")[0])
        target = out_dir / f"{source}_sm{arch}.cubin"
        cubin.rename(target)
        usage = subprocess.run(
            [cuobjdump, "-res-usage", str(target)], capture_output=True, text=True, check=True
        )
        (out_dir / f"{source}_sm{arch}.resusage.txt").write_text(usage.stdout)
        archs.add(arch)
    return sorted(archs)


# ----------------------------------------------------------------------------- the report


def auto_configs(arch: int) -> list[dict]:
    """The configurations `auto` can choose on sm_<arch> (tile_config.h via the op)."""
    import torch

    import snca_ext  # noqa: F401  (loads the op library)

    rows = []
    dtypes = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
    # 16-bit features at D > 128 are upcast to fp32 by the op: the fp32 rows at D = 129.
    for features, dims in (
        ("fp32", (64, 128, 129)),
        ("fp64", (128,)),
        ("bf16", (64, 128)),
        ("fp16", (64, 128)),
    ):
        for dim in dims:
            tc, dp, in_smem, lse_smem, topk_smem, fits, stages = torch.ops.snca_ext._cuda_tile_config(
                dim, dtypes[features], OPTIN[arch]
            )
            banks = ("fp64",) if features == "fp64" else ("fp32", "bf16", "fp16")
            for bank in banks:
                if stages:
                    engine = f"Mma16EngineILi{dp}E{FEATURES16[features]}{BANKS16[(features, bank)]}"
                    label = f"16-bit tensor cores, D<={dp}, {stages} stages"
                elif tc:
                    engine = f"TensorCoreEngineILi{dp}E{BANKS[bank]}Lb{int(in_smem)}E"
                    label = f"tensor cores, D<={dp}" + ("" if in_smem else ", queries via L2")
                else:
                    engine = "GenericEngineIdd" if features == "fp64" else f"GenericEngineIf{BANKS[bank]}"
                    label = "generic FMA" + (f", D={dim}" if features == "fp32" else "")
                rows.append(
                    {
                        "features": features,
                        "bank": bank,
                        "engine": engine,
                        "label": label,
                        "dp": dp,
                        "lse_smem": lse_smem,
                        "topk_smem": topk_smem,
                        "fits": bool(fits),
                        "stages": stages,
                    }
                )
    unique = {}
    for r in rows:
        unique.setdefault((r["features"], r["bank"], r["engine"]), r)
    return list(unique.values())


def _find(functions: dict, kernel: str, engine: str):
    # The mangled name holds the kernel's name after its length: topk_partial_kernel does not
    # match lse_topk_partial_kernel.
    for name, fn in functions.items():
        if f"{len(kernel)}{kernel}" in name and engine in name:
            return name, fn
    return None, None


def _machine_code_arch(target: int, built: list[int]) -> int | None:
    """The built arch whose machine code runs on sm_<target> (same major, minor at most target's)."""
    fitting = [b for b in built if b // 10 == target // 10 and b <= target]
    return max(fitting) if fitting else None


def estimate_ms(count: LoopCount, features: str, bank: str, device: str) -> dict[str, float]:
    """The estimate of the module doc for one lse kernel at D = 128 on `device`: issue-bound,
    bandwidth-bound, tensor-bound milliseconds, the estimate (their largest) and the floor."""
    dev = DEVICES[device]
    b, d, n = IMAGENET["B"], IMAGENET["D"], IMAGENET["N"]
    work = WARPS_PER_BLOCK * -(-n // 64) * -(-b // 64)  # warp-tiles: 8 warps x tiles x query blocks
    sixteen = features in ("bf16", "fp16")
    flops_per_mma, peak = (4096, dev["bf16_flops"]) if sixteen else (2048, dev["tf32_flops"])
    bank_bytes = n * d * BYTES[bank]
    issue = 1e3 * count.instructions * work / (dev["sms"] * SCHEDULERS_PER_SM * dev["clock_hz"])
    bandwidth = 1e3 * bank_bytes / dev["hbm_bytes_per_s"]
    tensor = 1e3 * count.mma * work * flops_per_mma / peak
    floor = 1e3 * max(bank_bytes / dev["hbm_bytes_per_s"], 3 * 2 * b * n * d / dev["bf16_flops"])
    return {
        "issue": issue,
        "bandwidth": bandwidth,
        "tensor": tensor,
        "estimate": max(issue, bandwidth, tensor),
        "floor": floor,
    }


def _disassembled(code: int, work: Path, compile_missing: bool) -> tuple[dict, dict[str, Function]]:
    """The ptxas resource entries and the disassembled functions of sm_<code>'s cubins in `work`
    (compiled there first when missing and compile_missing)."""
    if compile_missing and not (work / f"snca_forward_sm{code}.cubin").exists():
        build_cubins(code, work)
    ptxas: dict = {}
    functions: dict[str, Function] = {}
    for source in ("snca_forward", "bank_topk"):
        log = work / f"{source}_sm{code}.ptxas.txt"
        if log.exists():
            ptxas.update(parse_ptxas(log.read_text()))
        else:
            ptxas.update(parse_res_usage((work / f"{source}_sm{code}.resusage.txt").read_text(), code))
        text = subprocess.run(
            [_tool("nvdisasm"), "-g", "-c", str(work / f"{source}_sm{code}.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        functions.update(parse_nvdisasm(text))
    return ptxas, functions


def profile(arch: int, work: Path, built: list[int] | None, features: str = "bf16", top: int = 30) -> str:
    """The main loop of the forward with gradient at D = 128 (lse kernel, `features` / bf16 bank)
    on sm_<arch> by source line, its `top` lines with their source text, and the balance of issue
    slots against tensor-core time (an m16n8k16 keeps a scheduler's tensor core busy 4 cycles at
    the dense peak, an m16n8k8 TF32 one 4 at the TF32 peak, while the scheduler issues one
    warp-instruction a cycle: the loop is tensor-bound only with <= 4 instructions per MMA)."""
    code = arch if built is None else _machine_code_arch(arch, built)
    if code is None:
        raise SystemExit(f"sm_{arch}: the library has no machine code for it")
    _, functions = _disassembled(code, work, compile_missing=built is None)
    cfg = next(
        c for c in auto_configs(arch) if c["features"] == features and c["bank"] == "bf16" and c["dp"] == 128
    )
    _, fn = _find(functions, "lse_partial_kernel", cfg["engine"])
    if fn is None:
        raise SystemExit(f"sm_{arch}: lse_partial_kernel {cfg['engine']} not in the cubin")
    count = tile_loop_count(fn, 128)
    lines = profile_lines(tile_loop_profile(fn, 128), count, top)
    scores = 16 * 32 // 32  # a warp's 16 x 32 scores of the tile, per lane
    head = (
        f"sm_{arch} (code sm_{code}), {features} / bf16, {cfg['label']}, lse kernel with the gradient: "
        f"{count.instructions} warp-instructions per 64 x 64 tile and warp, {count.mma} MMAs "
        f"({100 * count.mma / count.instructions:.0f} %); per lane-score ({scores} a lane): "
        f"{count.instructions / scores:.1f} instructions, {count.mma / scores:.1f} MMAs; tensor-bound "
        f"needs <= {4 * count.mma} a tile ({4 * count.mma / scores:.0f} a lane-score, the MMAs included)."
    )
    return head + "\n\n" + lines


def profile_lines(rows: list[ProfileLine], count: LoopCount, top: int) -> str:
    """A markdown table of the `top` source lines of a tile_loop_profile(), with their source."""
    out = [
        "| per tile | share | source | opcodes | code |",
        "|---:|---:|---|---|---|",
    ]
    sources: dict[str, list[str]] = {}  # each source file read once
    for row in rows[:top]:
        text = ""
        if row.file and row.line and Path(row.file).exists():
            if row.file not in sources:
                sources[row.file] = Path(row.file).read_text(errors="replace").splitlines()
            source = sources[row.file]
            if 0 < row.line <= len(source):
                text = source[row.line - 1].strip().replace("|", "\\|")[:90]
        ops = ", ".join(f"{op} {n}" for op, n in sorted(row.opcodes.items(), key=lambda kv: -kv[1])[:4])
        where = f"{Path(row.file).name}:{row.line}" if row.file else "(no line)"
        share = 100 * row.count / count.instructions
        out.append(f"| {row.count} | {share:.1f} % | {where} | {ops} | `{text}` |")
    rest = sum(r.count for r in rows[top:])
    if rest:
        share = 100 * rest / count.instructions
        out.append(f"| {rest} | {share:.1f} % | {len(rows) - top} other lines | | |")
    return "\n".join(out)


def report(
    targets: list[int], cubin_dir: Path | None, built: list[int] | None = None, triton: bool = True
) -> tuple[str, list[str], list[str]]:
    """The markdown table, the missed hard targets (spills, fit, a main loop the source does not
    explain, the 16-bit engine's instruction target) and the main-loop figures of the headline
    configurations: fp32 features / bf16 bank and bf16 / bf16, forward with gradient at D = 128.

    targets: the architectures to report; built: the archs of existing cubins in cubin_dir (from a
    library), whose machine code stands in for the targets it runs on (sm_80's for sm_86/89);
    None: compile each target. triton: add the Triton kernels' rows (compiling them takes minutes)."""
    work = cubin_dir or Path(tempfile.mkdtemp(prefix="snca_static_"))
    failures: list[str] = []
    speed: list[str] = []
    lines = [
        "| arch (code) | features / bank | configuration | kernel | registers | spills st/ld B "
        "| shared B (opt-in) | warp-instr / tile | MMA / tile | estimate ms H100 / H200 (floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch in targets:
        code = arch if built is None else _machine_code_arch(arch, built)
        if code is None:
            failures.append(f"sm_{arch}: the library has no machine code for it")
            continue
        ptxas, functions = _disassembled(code, work, compile_missing=built is None)
        for cfg in auto_configs(arch):
            kernels = [("lse_partial_kernel", cfg["lse_smem"])]
            if not cfg["stages"]:  # 16-bit features: the top-k pass is the fp32 rows' kernel
                kernels.append(("topk_partial_kernel", cfg["topk_smem"]))
            if cfg["engine"].startswith(("TensorCore", "Mma16")):
                kernels.append(("lse_topk_partial_kernel", cfg["lse_smem"] + LSE_TOPK_EXTRA))
            for kernel, smem in kernels:
                name, fn = _find(functions, kernel, cfg["engine"])
                if fn is None:
                    failures.append(f"sm_{arch}: {kernel} {cfg['engine']} not in the cubin")
                    continue
                entry = next((v for (n, sm), v in ptxas.items() if n == name and sm == code), PtxasEntry())
                count = tile_loop_count(fn, cfg["dp"] or 64) if kernel.startswith("lse_") else None
                if entry.spill_stores or entry.spill_loads:
                    failures.append(f"sm_{arch} {kernel} {cfg['label']} {cfg['bank']}: spills")
                fused_falls_back = kernel == "lse_topk_partial_kernel" and smem > OPTIN[arch]
                if smem > OPTIN[arch] and not fused_falls_back:
                    failures.append(f"sm_{arch} {kernel} {cfg['label']}: {smem} bytes > {OPTIN[arch]}")
                if count and count.unexplained_mma_loops:
                    failures.append(f"sm_{arch} {kernel}: a loop with MMAs has no trip count (stale build?)")
                headline = cfg["features"] in ("fp32", "bf16") and cfg["bank"] == "bf16" and cfg["dp"] == 128
                if count and kernel == "lse_partial_kernel" and headline:
                    share = count.mma / count.instructions
                    speed.append(
                        f"sm_{arch} {cfg['features']} / bf16 {cfg['label']}: {count.instructions} "
                        f"warp-instructions per tile, {count.mma} MMAs ({100 * share:.0f} %)"
                    )
                    if cfg["stages"] and count.instructions > TARGET_INSTRUCTIONS16:
                        failures.append(
                            f"sm_{arch} {kernel} {cfg['label']} bf16: {count.instructions} warp-instructions "
                            f"per tile > {TARGET_INSTRUCTIONS16}"
                        )
                estimate = "-"
                if count and kernel == "lse_partial_kernel" and arch == 90 and cfg["dp"] == 128:
                    e = [estimate_ms(count, cfg["features"], cfg["bank"], dev) for dev in ("H100", "H200")]
                    estimate = (
                        f"{e[0]['estimate']:.2f} / {e[1]['estimate']:.2f} "
                        f"({e[0]['floor']:.2f} / {e[1]['floor']:.2f})"
                    )
                cells = [
                    f"sm_{arch} ({code})",
                    f"{cfg['features']} / {cfg['bank']}",
                    cfg["label"],
                    kernel.split("_kernel")[0],
                    entry.registers,
                    f"{entry.spill_stores}/{entry.spill_loads}",
                    f"{smem} ({OPTIN[arch]})" + (": does not fit, two passes" if fused_falls_back else ""),
                    count.instructions if count else "-",
                    count.mma if count else "-",
                    estimate,
                ]
                lines.append("| " + " | ".join(map(str, cells)) + " |")
    try:
        if not triton:
            raise ImportError
        sys.path.insert(0, str(ROOT))
        from gpu_checks.static_triton import triton_static_rows

        for r in triton_static_rows():
            keys = ("target", "config", "kernel", "registers", "spills_bytes", "shared_bytes")
            cells = [r.get(k) for k in keys] + [
                "-",
                r.get("warp_instructions_per_tile"),
                r.get("mma_per_tile"),
                "-",
            ]
            cells.insert(1, "triton")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    except ImportError:
        pass
    return "\n".join(lines), failures, speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", type=int, action="append", choices=sorted(OPTIN), help="repeatable; default all"
    )
    parser.add_argument(
        "--cubin-dir", type=Path, help="reuse (or keep) the cubins and ptxas logs in this folder"
    )
    parser.add_argument("--so", action="store_true", help="read the built snca_ext._C instead of compiling")
    parser.add_argument(
        "--no-triton", action="store_true", help="leave out the Triton rows (their compilation takes minutes)"
    )
    parser.add_argument(
        "--profile",
        choices=("bf16", "fp32"),
        help="instead of the report: the main loop of the <features> / bf16 forward with gradient at "
        "D = 128 by source line (on the first --arch, default sm_90)",
    )
    args = parser.parse_args(argv)
    built = None
    if args.so:
        from snca_ext import _C

        args.cubin_dir = args.cubin_dir or Path(tempfile.mkdtemp(prefix="snca_static_so_"))
        args.cubin_dir.mkdir(parents=True, exist_ok=True)
        built = extract_so(Path(_C.__file__), args.cubin_dir)
    elif args.cubin_dir:
        args.cubin_dir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        work = args.cubin_dir or Path(tempfile.mkdtemp(prefix="snca_static_"))
        print(profile((args.arch or [90])[0], work, built, args.profile))
        return 0
    table, failures, speed = report(args.arch or sorted(OPTIN), args.cubin_dir, built, not args.no_triton)
    print(table)
    print()
    print(
        "Targets: no spills in any configuration auto can choose; every configuration fits "
        f"sm_80, sm_86/89, sm_90; the bf16 / bf16 forward with gradient at D = 128 <= "
        f"{TARGET_INSTRUCTIONS16} warp-instructions per tile."
    )
    print("All met." if not failures else "Missed:\n  " + "\n  ".join(failures))
    print(
        "Main loops of the forward with gradient at D = 128, targets: fp32 / bf16 <= "
        f"{TARGET_INSTRUCTIONS} per tile; bf16 / bf16 <= {TARGET_INSTRUCTIONS16} per tile with "
        f">= {100 * TARGET_MMA_SHARE16:.0f} % tensor-core instructions:"
    )
    print("  " + "\n  ".join(speed))
    print(
        "Estimate column (sm_90, D = 128, lse kernel with the gradient): projected fwd+bwd ms at "
        "B = 256, N = 1,281,167 = max(issue-bound, bandwidth-bound, tensor-bound), floor = "
        "max(bank bytes / HBM bandwidth, 3 x 2BND / 989 TFLOP/s); see the module doc. An estimate."
    )
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
