"""Issue 14, item 4: any data pipeline. One-shot sources (generators, DataLoader iterators)
reach the loop whole, the replay draws only batches the task produced, and no probe or draw
takes a batch from the loop."""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import warpopt

DTYPE = torch.float64
loss_fn = nn.functional.mse_loss


def make_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).to(DTYPE)
    return warpopt.warp(net)


def batches(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 1, generator=g, dtype=DTYPE)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, generator=g, dtype=DTYPE)
        out.append((x, torch.sin(x @ w)))
    return out


class Recording:
    """A batch loss that notes which batch objects the replay evaluates."""

    def __init__(self):
        self.ids = []

    def __call__(self, forward, batch):
        self.ids.append(id(batch))
        x, y = batch
        return loss_fn(forward(x), y)


def one_shot(kind, data):
    if kind == "generator":
        return (b for b in data)
    xs, ys = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    return iter(DataLoader(TensorDataset(xs, ys), batch_size=len(data[0][0])))


@pytest.mark.parametrize("kind", ["generator", "dataloader_iterator"])
@pytest.mark.parametrize("initialisation", ["leap", "maml"])
def test_a_one_shot_source_reaches_the_loop_whole_and_the_replay_draws_only_its_batches(kind, initialisation):
    model = make_model()
    algorithm = warpopt.online() if initialisation == "maml" else warpopt.offline()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, algorithm=algorithm,
                                        initialisation=getattr(warpopt, initialisation)())
    data = batches(1)
    recording = Recording()
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step replayed" nor "read ahead" warning
        with opt.task(one_shot(kind, data), batch_loss=recording) as task:
            for batch in task:
                seen.append(batch)
                x, y = batch
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        loop_ids = {id(task.loop_batch(k)) for k in range(5)}
        stats = opt.meta_step()
    assert len(seen) == 5  # the loop saw 5 of 5 batches (Leap's probe took none)
    for (x, y), (x0, y0) in zip(seen, data):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    assert [id(b) for b in seen] == [id(task.loop_batch(k)) for k in range(5)]  # references, no copies
    assert recording.ids and set(recording.ids) <= loop_ids  # the replay drew only batches the task produced
    assert len(set(recording.ids)) > 1  # L_task and L_meta are not all on one batch
    assert stats["warp_updates"] == (6 if initialisation == "leap" else 1)  # offline: K + 1 points; online: 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_one_shot_meta_data_source_takes_fresh_batches_then_cycles():
    data, meta = batches(1, n=2), batches(2, n=3)
    task = warpopt.Task(data, loss_fn, meta_data=(b for b in meta))
    drawn = [task.meta_batch(k) for k in range(5)]
    assert [id(b) for b in drawn] == [id(meta[i]) for i in (0, 1, 2, 0, 1)]


def test_a_re_iterable_source_is_drawn_by_an_iterator_of_its_own():
    """A DataLoader: the loop iterates it as usual, the draws re-iterate it separately (fresh
    batches), so the loop's batches are exactly the loader's."""
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    xs = torch.randn(20, 3, dtype=DTYPE)
    loader = DataLoader(TensorDataset(xs, xs.sum(1, keepdim=True)), batch_size=4)
    seen = []
    with opt.task(loader, loss_fn):
        for x, y in loader:
            seen.append(x)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert len(seen) == 5 and torch.equal(torch.cat(seen), xs)
    opt.meta_step()


def test_a_loop_that_iterates_the_generator_itself_is_warned_that_it_lost_the_probe_batch():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.leap(loss="probe"))  # draws at the start
    gen = (b for b in batches(1))
    seen = 0
    with pytest.warns(RuntimeWarning, match=r"1 batch\(es\) of your one-shot data.*Iterate the task"):
        with opt.task(gen, loss_fn):
            for x, y in gen:
                seen += 1
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    assert seen == 4  # what the warning is about
    opt.meta_step()  # the replay draws from the batch it read ahead



def test_the_default_leap_probing_at_the_first_step_warns_a_loop_that_iterates_the_generator_itself():
    # leap() reads ΔL off the loop's batches; a loop over the generator hides them, so the probe
    # draws at the first step, after the loop took its first batch: the loop loses the second.
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1)
    gen = (b for b in batches(1))
    seen = 0
    with pytest.warns(RuntimeWarning, match=r"1 batch\(es\) of your one-shot data.*Iterate the task"):
        with opt.task(gen, loss_fn):
            for x, y in gen:
                seen += 1
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    assert seen == 4


def test_a_loop_that_consumed_the_generator_itself_fails_at_the_task_end_and_records_nothing():
    # Nothing read the generator onto the tape, so the replay would have no batch: say so at the
    # task's end, rolled back, rather than at every later meta_step() (the task would stay in the buffer).
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())
    theta = [p.detach().clone() for p in model.parameters()]
    gen = (b for b in batches(1))
    with pytest.raises(ValueError, match="your loop read the one-shot data.*itself.*Iterate the task"):
        with opt.task(gen, loss_fn):
            for x, y in gen:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    assert len(opt.replay) == 0 and opt.counters["tasks"] == 0
    with opt.task(batches(2), loss_fn) as task:  # the optimizer is usable
        for x, y in task:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert opt.meta_step()["warp_updates"] == 6


def test_an_exhausted_generator_fails_at_the_task_start_with_the_fix_and_changes_nothing():
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.leap(loss="probe"))
    gen = (b for b in batches(1))
    list(gen)
    theta = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="task data is empty.*Iterate the task"):
        with opt.task(gen, loss_fn):
            pass
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    assert [p.requires_grad for p in model.parameters()] == flags  # φ not left frozen
    assert opt._run is None and len(opt.replay) == 0
    with opt.task(batches(2), loss_fn) as task:  # the optimizer is usable
        for x, y in task:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    opt.meta_step()


def test_task_none_is_refused_by_the_optimizer():
    opt = warpopt.WarpGradMetaOptimizer(make_model(), lr=0.1)
    with pytest.raises(TypeError, match="task data is None"):
        with opt.task(None, loss_fn):
            pass


@pytest.mark.parametrize("batch", [{"x": 0, "y": 1}, (0, 1, 2)])
def test_a_batch_that_is_not_inputs_and_target_is_refused_with_the_batch_loss_recipe(batch):
    # A dict batch unpacked into its keys reached the model as strings ("must be Tensor, not str").
    x, y = batches(1, n=1)[0]
    batch = {"x": x, "y": y} if isinstance(batch, dict) else (x, y, 7)
    task = warpopt.Task([batch], loss_fn)
    with pytest.raises(TypeError, match="takes batches \\(inputs, target\\).*batch_loss="):
        task.task_loss(make_model(), task.task_batch(0))
    task = warpopt.Task([batch], batch_loss=lambda forward, b: loss_fn(forward(b["x"] if isinstance(b, dict) else b[0]),
                                                                        b["y"] if isinstance(b, dict) else b[1]))
    assert torch.isfinite(task.task_loss(make_model(), task.task_batch(0)))


@pytest.mark.parametrize("empty", ["list", "dataloader_drop_last"])
def test_an_empty_re_iterable_fails_at_the_task_end_not_at_every_later_meta_step(empty):
    # The 0-step task was committed (its θ_0 point) and every meta_step() failed on it after.
    model = make_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.none())
    xs = torch.randn(3, 3, dtype=DTYPE)
    data = [] if empty == "list" else DataLoader(TensorDataset(xs, xs[:, :1]), batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="data is empty.*rolled back"):
        with opt.task(data, loss_fn) as task:
            for x, y in task:
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
    assert len(opt.replay) == 0
    with opt.task(batches(2), loss_fn) as task:
        for x, y in task:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    assert opt.meta_step()["warp_updates"] == 6
