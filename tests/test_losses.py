import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from ssl_bocb import dist
from ssl_bocb.losses import contrastive_loss


def test_loss_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # normalised: q = [[1,0],[0,1]], k = [[1,0],[s,s]] with s = 1/sqrt(2)
    s = 1 / math.sqrt(2)
    logits = torch.tensor([[1.0, s], [0.0, s]]) / tau
    row0 = -logits[0, 0] + torch.logsumexp(logits[0], 0)
    row1 = -logits[1, 1] + torch.logsumexp(logits[1], 0)
    expected = (row0 + row1) / 2 * 2 * tau
    assert contrastive_loss(q, k, tau).item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_is_scale_invariant():
    torch.manual_seed(0)
    q1, k2 = (torch.randn(8, 16) for _ in range(2))
    assert contrastive_loss(q1 * 3, k2 / 5, 0.2).item() == pytest.approx(contrastive_loss(q1, k2, 0.2).item(), rel=1e-5)


def test_keys_get_no_gradient():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_single_process_helpers():
    x = torch.randn(3, 2)
    assert dist.world_size() == 1 and dist.rank() == 0
    assert torch.equal(dist.gather_nograd(x), x)


def _worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    W = torch.randn(6, 4)
    x = torch.randn(8, 6)
    xk = torch.randn(8, 6)
    n = 8 // world
    w = W.clone().requires_grad_(True)
    q = x[rank * n:(rank + 1) * n] @ w
    k = xk[rank * n:(rank + 1) * n] @ W
    loss = contrastive_loss(q, k, 0.2)
    loss.backward()
    # DDP averages gradients over processes: do the same by hand
    grad = w.grad.clone()
    torch.distributed.all_reduce(grad)
    grad /= world
    ls = loss.detach().clone()
    torch.distributed.all_reduce(ls)
    ls /= world
    if rank == 0:
        torch.save({"loss": ls, "grad": grad}, os.path.join(out_dir, "two.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_on_same_global_batch(tmp_path):
    init_file = str(tmp_path / "init")
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    two = torch.load(tmp_path / "two.pt")
    torch.manual_seed(0)
    W = torch.randn(6, 4)
    x = torch.randn(8, 6)
    xk = torch.randn(8, 6)
    w = W.clone().requires_grad_(True)
    loss = contrastive_loss(x @ w, xk @ W, 0.2)
    loss.backward()
    assert two["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(two["grad"], w.grad, atol=1e-6, rtol=1e-5)


def test_loss_under_bf16_autocast_equals_the_fp32_loss():
    torch.manual_seed(0)
    q = torch.randn(32, 64, requires_grad=True)
    k = torch.randn(32, 64)
    ref = contrastive_loss(q, k, 0.2)
    (g_ref,) = torch.autograd.grad(ref, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(q, k, 0.2)
    (g,) = torch.autograd.grad(loss, q)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8)
