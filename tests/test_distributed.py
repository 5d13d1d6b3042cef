"""Distributed meta-training (warpopt.distributed): 2 gloo processes == 1 process on the same tasks.

Four fixed tasks split 2/2. With equal shares, the all-reduced mean of the ranks' mean
meta-gradients is the mean over all tasks (online: over all tasks' steps; offline with one
mini-batch holding the whole buffer: over all points; θ0: over all tasks), so after every
meta-step φ and θ0 agree with one process up to summation order.
"""
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import warpopt
from warpopt import distributed as wd

STEPS, META_STEPS, TASKS = 3, 2, 4


def _tasks():
    g = torch.Generator().manual_seed(123)
    tasks = []
    for _ in range(TASKS):
        xs = [torch.randn(6, 2, generator=g, dtype=torch.float64) for _ in range(4)]
        ys = [torch.randn(6, 1, generator=g, dtype=torch.float64) for _ in range(4)]
        tasks.append(lambda k, xs=xs, ys=ys: (xs[k % 4], ys[k % 4]))  # deterministic in k
    return tasks


def _train(algorithm, seed, reduce=None, broadcast=False):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model = warpopt.warp(net)
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.1 * torch.randn_like(p))
    algo = warpopt.online() if algorithm == "online" else warpopt.offline(batch_size=10_000)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=0.01, algorithm=algo,
                                        initialisation=warpopt.leap(), reduce=reduce)
    if broadcast:
        wd.broadcast_parameters(opt)
    for _ in range(META_STEPS):
        for data in wd.rank_tasks(_tasks()):
            with opt.task(data, nn.functional.mse_loss):
                for k in range(STEPS):
                    x, y = data(k)
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
        opt.meta_step()
    return ([p.detach().clone() for p in opt.meta_parameters()], [t.detach().clone() for t in opt.theta0])


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for algorithm in ("online", "offline"):
            # a different seed per rank: only the broadcast makes the ranks start identical
            results[algorithm] = _train(algorithm, seed=rank, reduce=wd.all_reduce_mean(), broadcast=True)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_processes_equal_one():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    for algorithm in ("online", "offline"):
        single_warp, single_theta0 = _train(algorithm, seed=0)  # rank 0's initialisation, all 4 tasks
        start_warp, start_theta0 = _initial(seed=0)
        for r in range(2):
            warp, theta0 = ranks[r][algorithm]
            for a, b in zip(warp + theta0, single_warp + single_theta0):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        # and meta-training did move both φ and θ0
        assert any(not torch.allclose(a, b) for a, b in zip(single_warp, start_warp))
        assert any(not torch.allclose(a, b) for a, b in zip(single_theta0, start_theta0))


def _initial(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model = warpopt.warp(net)
    with torch.no_grad():
        for p in model.warp_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return [p.detach().clone() for p in model.warp_parameters()], [p.detach().clone() for p in model.adapt_parameters()]


def test_helpers_outside_a_process_group():
    assert wd.world_size() == 1 and wd.rank() == 0
    assert wd.rank_tasks([1, 2, 3]) == [1, 2, 3]
    grads = [torch.ones(2)]
    assert wd.all_reduce_mean()(grads) is grads
    assert wd.backend_for("cpu") == "gloo" and wd.backend_for("cuda:0") == "nccl"
