"""Builds snca_ext._C: the C++ CPU kernels always, the CUDA kernels when they can be built.

The CUDA sources are compiled when torch is a CUDA build and a CUDA toolkit (nvcc) is found;
set SNCA_EXT_BUILD_CUDA=0 to skip them, or =1 to insist (the build then fails without a toolkit).
The kernels need sm_80 or newer: older entries of TORCH_CUDA_ARCH_LIST (or, when it is unset, of the
visible GPUs) are dropped with a message, and the CUDA kernels are skipped when none remain, so a
pre-Ampere GPU never fails the build. With no GPU visible the list defaults to "8.0;9.0". The list
built is recorded in the library (torch.ops.snca_ext._cuda_archs()), so that at run time `auto`
skips `cuda` on a GPU the binary has no code for.
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

# torch finds nvcc on PATH first; a wrapper script there (e.g. /usr/local/bin/nvcc) would make it
# look for the CUDA libraries under /usr/local. The toolkit's conventional home wins when present.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
    "/usr/local/cuda/bin/nvcc"
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "snca_ext needs PyTorch installed before it is built: run `pip install torch` first, "
        "then `pip install --no-build-isolation -e .` (see README.md)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_arch():
    # The package is not importable before it is built; this module needs the standard library only.
    path = os.path.join(HERE, "snca_ext", "_cuda_arch.py")
    spec = importlib.util.spec_from_file_location("_snca_cuda_arch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(message: str) -> None:
    print(f"[snca_ext] {message}", file=sys.stderr)


def _want_cuda() -> bool:
    setting = os.environ.get("SNCA_EXT_BUILD_CUDA", "auto").lower()
    if setting in ("0", "false", "no", "off"):
        _log("CUDA backend: skipped (SNCA_EXT_BUILD_CUDA=0)")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    if not glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")):
        reasons.append("no CUDA sources in csrc/cuda")
    if reasons:
        if setting in ("1", "true", "yes", "on"):
            sys.exit("SNCA_EXT_BUILD_CUDA=1 but the CUDA backend cannot be built: " + "; ".join(reasons))
        _log("CUDA backend: not built (" + "; ".join(reasons) + ")")
        return False
    return True


def _cuda_arch_list() -> str:
    """The architectures to build the CUDA kernels for, >= sm_80 only ("" = skip the kernels)."""
    visible = []
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
        visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    try:
        archs, message = _load_cuda_arch().build_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible)
    except ValueError as error:
        archs, message = "", f"CUDA backend: not built: {error}"
    _log(message)
    if not archs and os.environ.get("SNCA_EXT_BUILD_CUDA", "auto").lower() in ("1", "true", "yes", "on"):
        sys.exit("SNCA_EXT_BUILD_CUDA=1 but " + message)
    return archs


def _extension():
    sources = [os.path.join("csrc", "ops.cpp"), *sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))]
    cxx_flags = ["-O3", "-fopenmp"]  # BuildExtension picks the C++ standard torch needs
    link_flags = ["-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; the kernels then run on one thread
        cxx_flags.remove("-fopenmp")
        link_flags = []
    archs = _cuda_arch_list() if _want_cuda() else ""
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        _log(f"backends: cpu, cuda (TORCH_CUDA_ARCH_LIST={archs})")
        # ops.cpp records the list (commas: no shell-special character on the command line; only the
        # C++ compiler gets it, nvcc would read the commas as separators).
        record = [f"-DSNCA_CUDA_ARCHS={archs.replace(';', ',')}"]
        return CUDAExtension(
            "snca_ext._C",
            sources,
            extra_compile_args={
                "cxx": cxx_flags + record,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=link_flags,
        )
    _log("backends: cpu")
    return CppExtension(
        "snca_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )


def _ext_modules():
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _log(
            f"no C++ compiler found ({compiler!r} is not on PATH): installing without the compiled "
            "kernels; only the 'reference' (and, with a GPU, 'triton') backends will be available. "
            "Install g++ (e.g. `apt-get install g++`) and reinstall to build the 'cpu' and 'cuda' backends."
        )
        return []
    return [_extension()]


setup(
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
