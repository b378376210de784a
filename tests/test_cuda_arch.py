"""Which GPUs the CUDA backend is built for and runs on (setup.py and ops.py), without a GPU: the
decisions are pure functions of an arch list and a compute capability."""

import warnings

import pytest
import torch

from snca_ext import _cuda_arch, backends, ops


@pytest.mark.parametrize(
    ("env", "visible", "built", "says"),
    [
        ("8.0;9.0", [], "8.0;9.0", "built for 8.0;9.0"),
        ("7.0;7.5;8.0;8.6+PTX;9.0a", [], "8.0;8.6+PTX;9.0a", "dropped 7.0;7.5"),
        ("7.5", [], "", "not built"),
        ("Turing Ampere", [], "8.0;8.6+PTX", "dropped 7.5+PTX"),
        (None, [(7, 5)], "", "not built"),  # a T4: the CPU kernels are still built
        (None, [(7, 0), (9, 0)], "9.0", "dropped 7.0"),
        (None, [], "8.0;9.0", "without a GPU"),
        ("", [(8, 6)], "8.6", "visible GPUs"),
    ],
)
def test_build_arch_list_drops_pre_ampere(env, visible, built, says):
    archs, message = _cuda_arch.build_arch_list(env, visible)
    assert archs == built
    assert says in message


def test_build_arch_list_names_a_malformed_entry():
    with pytest.raises(ValueError, match="'sm_90'"):
        _cuda_arch.build_arch_list("sm_90", [])


@pytest.mark.parametrize(
    ("archs", "capability", "runs"),
    [
        ("8.0;9.0", (8, 0), True),
        ("8.0;9.0", (8, 6), True),  # sm_80 machine code runs on every 8.x
        ("8.0;9.0", (8, 9), True),
        ("8.0;9.0", (9, 0), True),
        ("8.0;9.0", (7, 5), False),
        ("8.0;9.0", (10, 0), False),  # machine code does not cross a major version
        ("8.0;9.0", (12, 0), False),
        ("8.0;9.0+PTX", (12, 0), True),  # PTX is compiled by the driver for newer GPUs
        ("9.0+PTX", (8, 6), False),
        ("9.0", (8, 9), False),
        ("9.0a", (9, 0), True),
        ("9.0a", (10, 0), False),  # arch-specific code runs on that architecture only
        ("8.6", (8, 0), False),
        ("8.0,9.0", (9, 0), True),  # the form recorded in the library
        ("", (9, 0), False),
    ],
)
def test_runs_on(archs, capability, runs):
    assert _cuda_arch.runs_on(archs, capability) is runs
    reason = _cuda_arch.unusable_reason(archs, capability)
    assert (reason is None) is runs
    if not runs:
        assert f"sm_{capability[0]}{capability[1]}" in reason


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen capability, and a binary that holds CUDA kernels for 8.0;9.0."""

    def install(capability):
        monkeypatch.setitem(backends.COMPILED_FOR, "cuda", True)
        monkeypatch.setattr(_cuda_arch, "_device_reason", {})
        monkeypatch.setattr(_cuda_arch, "compiled_arch_list", lambda: "8.0;9.0")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        # The machine has the device (available_backends lists nothing on a device it lacks).
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        return torch.device("cuda", 0)

    return install


def test_auto_skips_cuda_on_a_gpu_without_code_with_one_warning(fake_gpu):
    device = fake_gpu((7, 5))
    with pytest.warns(RuntimeWarning, match="skipped on cuda:0: the GPU is sm_75"):
        listed = ops.available_backends(device)
    assert "cuda" not in listed and listed[-1] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device, not per call
        assert backends.resolve_backend("auto", device) == listed[0]
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cuda:0: the GPU is sm_75"):
        backends.resolve_backend("cuda", device)


def test_auto_picks_cuda_on_a_gpu_with_code(fake_gpu):
    device = fake_gpu((8, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend("auto", device) == "cuda"
        assert backends.resolve_backend("cuda", device) == "cuda"


def test_a_newer_gpu_names_the_rebuild(fake_gpu):
    device = fake_gpu((12, 0))
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"TORCH_CUDA_ARCH_LIST=12\.0"):
        backends.resolve_backend("cuda", device)


@pytest.mark.skipif(not backends.COMPILED_FOR["cuda"], reason="snca_ext._C built without the CUDA kernels")
def test_the_library_records_its_arch_list():
    archs = _cuda_arch.compiled_arch_list()
    assert archs and _cuda_arch.filter_arch_list(archs)[1] == []
