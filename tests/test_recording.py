"""Recording into the replay buffer's arena (warpopt/points.py ``Arena``): bit-exact points,
memory reused across tasks and meta-steps, never memory someone else still holds."""
import pytest
import torch
from torch import nn

import warpopt
from warpopt.points import Arena, flatten_point, unflatten_point


def mixed_point_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    p32 = torch.randn(7, generator=g)
    p64 = torch.randn(3, 2, generator=g, dtype=torch.float64) + 2.0 ** -40
    states = [{"step": torch.tensor(3.0), "exp_avg": p32 * 0.1}, {"step": torch.tensor(3.0), "exp_avg": p64 * 0.1}]
    buffers = [torch.tensor(2 ** 60 + seed, dtype=torch.int64), torch.tensor([True, False])]
    return [p32, p64], states, buffers


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_arena_points_are_bit_exact_and_reuse_memory(dtype):
    arena = Arena()
    params, states, buffers = mixed_point_inputs(0)
    first = flatten_point(2, params, states, buffers, dtype, arena)
    reference = flatten_point(2, params, states, buffers, dtype)
    assert [v.dtype for v in first.vectors] == [v.dtype for v in reference.vectors]
    assert all(torch.equal(a, b) for a, b in zip(first.vectors, reference.vectors))  # bit for bit
    memory = {v.data_ptr() for v in first.vectors}
    arena.give_back(first.vectors)
    del first
    params, states, buffers = mixed_point_inputs(1)
    second = flatten_point(3, params, states, buffers, dtype, arena)
    assert {v.data_ptr() for v in second.vectors} == memory  # the same memory, rewritten
    got = unflatten_point(second, torch.device("cpu"))
    want = unflatten_point(flatten_point(3, params, states, buffers, dtype), torch.device("cpu"))
    for a, b in zip(got[0] + got[2] + [s[k] for s in got[1] for k in s],
                    want[0] + want[2] + [s[k] for s in want[1] for k in s]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_arena_never_hands_out_memory_still_viewed_and_ignores_foreign_vectors():
    arena = Arena()
    params, states, buffers = mixed_point_inputs(0)
    point = flatten_point(0, params, states, buffers, arena=arena)
    held, _, _ = unflatten_point(point, torch.device("cpu"))  # views of the point's vectors
    kept = [h.clone() for h in held]
    arena.give_back(point.vectors)
    arena.give_back([torch.zeros(5)])  # not the arena's: ignored
    other = flatten_point(1, *mixed_point_inputs(1), arena=arena)
    assert not {v.data_ptr() for v in other.vectors} & {v.data_ptr() for v in point.vectors}
    assert all(torch.equal(h, k) for h, k in zip(held, kept))  # what the caller holds never changed
    assert arena.nbytes() == 0


def tiny():
    torch.manual_seed(0)
    return warpopt.warp(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))


def run_task(opt, model, seed, steps=3, fail=False):
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)) for _ in range(steps)]
    with opt.task(data, nn.functional.mse_loss):
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        if fail:
            raise KeyboardInterrupt


def stored(buffer):
    return {v.data_ptr() for _, p in buffer._points for v in p.vectors}


def test_the_task_loop_reuses_the_buffers_memory_across_meta_steps():
    """After the first meta-batch, recording allocates nothing: the points of the next one live in
    the memory the first one used, and replay reads what was recorded (the live trajectory)."""
    model = tiny()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())
    run_task(opt, model, 1)
    run_task(opt, model, 2)
    first = stored(opt.replay)
    assert len(first) == 8 and opt.replay.arena_nbytes() == 0
    held = opt.replay.nbytes()
    opt.meta_step()  # clears the buffer: its memory goes back to the arena
    assert len(opt.replay) == 0 and opt.replay.arena_nbytes() == held
    run_task(opt, model, 3)
    run_task(opt, model, 4)
    assert stored(opt.replay) == first
    sample = opt.replay.sample(len(opt.replay) - 1, torch.device("cpu"))  # θ_K of the last task
    assert all(torch.equal(a, b) for a, b in zip(sample.params, model.adapt_parameters()))
    opt.replay.close()
    assert opt.replay.arena_nbytes() == 0 and len(opt.replay) == 0


def test_dropped_tasks_and_reservoir_rejects_give_their_memory_back():
    model = tiny()
    buffer = warpopt.ReplayBuffer(capacity=5)
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none(), replay=buffer)
    with pytest.raises(KeyboardInterrupt):
        run_task(opt, model, 1, fail=True)
    assert len(buffer) == 0 and buffer.arena_nbytes() > 0  # the dropped task's points are free again
    free = buffer.arena_nbytes()
    run_task(opt, model, 2)  # 4 points, reuses the dropped task's memory
    assert buffer.arena_nbytes() == 0 and len(buffer) == 4
    for seed in range(3, 9):  # 4 points offered each, 5 kept: the others' memory comes back
        run_task(opt, model, seed)
    assert len(buffer) == 5
    assert buffer.arena_nbytes() <= free  # never more than one task's worth outside the buffer


def test_disk_storage_frees_the_recorded_vectors_at_commit(tmp_path):
    """Points on disk do not keep their recording memory; they replay bit-exactly."""
    model = tiny()
    buffer = warpopt.ReplayBuffer(storage=warpopt.DiskStorage(str(tmp_path)))
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none(), replay=buffer)
    run_task(opt, model, 1)
    assert buffer.nbytes() == 0 and buffer.arena_nbytes() > 0
    last = buffer.sample(len(buffer) - 1, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(last.params, model.adapt_parameters()))
    buffer.close()
