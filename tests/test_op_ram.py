"""The CPU op never builds a B x N matrix: it runs where B x N cannot be allocated at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# B = 64, N = 4M, D = 4: the bank is 64 MB and its labels 32 MB, while one B x N float32 matrix
# would be 1 GB. The child caps its address space at what it uses + 600 MB, so the materialising
# reference must fail there and the streaming op must pass.
CHILD = textwrap.dedent(
    """
    import resource, sys
    import torch
    from torch.nn import functional as F
    import snca_ext
    from snca_ext import reference

    torch.manual_seed(0)
    B, N, D = 64, 4_000_000, 4
    bank = F.normalize(torch.randn(N, D), dim=1)
    bank_labels = torch.randint(0, 1000, (N,))
    indices = torch.randint(0, N, (B,))
    features = F.normalize(bank[indices] + 0.1 * torch.randn(B, D), dim=1).requires_grad_()
    with open("/proc/self/status") as status:
        vm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
    limit = vm_kb * 1024 + 600 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    loss = snca_ext.snca_loss(features, indices, bank, bank_labels, 0.05, backend=sys.argv[1])
    loss.backward()
    values, rows = snca_ext.bank_topk(features.detach(), bank, 30, exclude=indices, backend=sys.argv[1])
    assert torch.isfinite(loss) and torch.isfinite(features.grad).all() and rows.shape == (B, 30)
    print("ok", float(loss))
    """
)


def run_child(backend: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, backend], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and sets RLIMIT_AS")
def test_cpu_op_runs_where_a_batch_by_bank_matrix_cannot_be_allocated():
    streamed = run_child("cpu")
    assert streamed.returncode == 0, streamed.stderr[-3000:]
    assert streamed.stdout.startswith("ok")
    # The same cap stops the materialising reference: the test would catch a B x N allocation.
    materialised = run_child("reference")
    assert materialised.returncode != 0
    assert "memory" in materialised.stderr.lower() or "alloc" in materialised.stderr.lower()
