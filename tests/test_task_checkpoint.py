"""Checkpoints between any two steps of a task (issue 14, item 7; warpopt/task_checkpoint.py)."""
from __future__ import annotations

import copy
import io
import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

import warpopt

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import resume_task_run as R


def _equal(a, b) -> bool:
    """Bit-identical nested results (tensors by torch.equal, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def _through_a_file(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # tensors and plain containers only: no code runs


def _reference(config: str) -> dict:
    model, opt = R.build(config)
    return R.result(opt, model, R.run(opt, model))


def test_a_checkpoint_inside_a_task_resumes_bit_identically_in_a_fresh_process(tmp_path):
    references = {config: _reference(config) for config in R.CONFIGS}
    saved = {config: R.checkpoint(config) for config in R.CONFIGS}
    for config, entry in saved.items():  # each one really is inside a task, after k steps
        assert entry["opt"]["task_in_progress"]["steps"] == R.CONFIGS[config][4]
    assert saved["offline-leap"]["opt"]["pending"] is not None  # mid meta-batch as well
    path = tmp_path / "checkpoints.pt"
    torch.save(saved, path)
    out = tmp_path / "resumed.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pathlib.Path(warpopt.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(pathlib.Path(R.__file__)), str(path), str(out)],
                   check=True, env=env, timeout=300)
    resumed = torch.load(out, weights_only=True)
    for config, reference in references.items():
        for key in ("phi", "theta0", "meta_optimizer", "init_optimizer", "counters", "losses"):
            assert _equal(resumed[config][key], reference[key]), (config, key)  # bit-identical
    # What makes it so is in the checkpoint: resumed without the RNG state (dropout), not.
    entry = _through_a_file(saved["online-leap"])
    del entry["opt"]["rng"]
    assert not _equal(R.resume("online-leap", entry)["phi"], references["online-leap"]["phi"])


def _interrupted(config: str = "offline-leap"):
    """An optimizer holding the checkpoint of ``config`` (loaded into a fresh one), its model."""
    saved = _through_a_file(R.checkpoint(config))
    model, opt = R.build(config, seed=7)
    model.load_state_dict(saved["model"])
    pending = saved["opt"]["pending"]
    tasks = [R.reattach(int(t["name"].split()[1])) for t in pending["tasks"]] if pending else None
    opt.load_state_dict(saved["opt"], tasks=tasks)
    return saved, model, opt, tasks


def test_the_task_in_progress_is_saved_as_tensors_and_plain_data():
    model, opt = R.build("offline-probe")
    R.run(opt, model, stop=1)
    with opt.task(R.source(1), R.loss_fn, name="task 1"):
        for x, y in R.task_data(1)[:2]:
            opt.zero_grad()
            R.loss_fn(model(x), y).backward()
            opt.step()
        sd = opt.state_dict()
        running = sd["task_in_progress"]
        assert running["steps"] == 2 and len(running["trajectory"]["points"]) == 3  # θ_0, θ_1, θ_2
        assert running["init_state"]["namedtuple"] == "LeapState"  # with its probe batch and last loss
        assert isinstance(running["init_state"]["fields"]["probe"][0], torch.Tensor)
        assert running["optimizer"] is sd["task"]  # the task optimizer at step 2, saved once
    loaded = _through_a_file(sd)
    assert torch.equal(loaded["task_in_progress"]["params"][0], running["params"][0])
    assert opt.state_dict()["task_in_progress"] is None  # between tasks


def test_a_resumed_task_continues_at_its_step_and_can_be_saved_again():
    saved, model, opt, _ = _interrupted()
    info = opt.task_in_progress
    assert info == {"name": "task 4", "steps": 2, "kind": "iterable", "batches_read": None}
    again = opt.state_dict()  # a pending task is saved again as it was
    assert _equal(again["task_in_progress"], saved["opt"]["task_in_progress"])
    with opt.task(R.source(4), R.loss_fn, name="task 4") as task:
        assert task.start_step == 2
        assert _equal([b for b in task], R.task_data(4)[2:])  # iterating the task skips the batches of steps 0, 1
        at_step_2 = saved["opt"]["task_in_progress"]["params"]
        assert all(torch.equal(p, q) for p, q in zip(model.adapt_parameters(), at_step_2))
    assert opt.task_in_progress is None and opt.counters["tasks"] == 5


def test_a_pending_interrupted_task_blocks_meta_step_and_other_tasks_until_continued_or_discarded():
    saved, model, opt, _ = _interrupted()
    with pytest.raises(RuntimeError, match=r"meta_step\(\) while the task a checkpoint interrupted is pending "
                                           r"\('task 4' after 2 steps\).*discard_task_in_progress"):
        opt.meta_step()
    before = [p.detach().clone() for p in model.adapt_parameters()]
    with pytest.raises(ValueError, match=r"'task 4' at step 2, and opt.task\(\) was given 'task 9'"), \
            opt.task(R.source(9), R.loss_fn, name="task 9"):
        pass
    with pytest.raises(ValueError, match="saved with iterable data"), \
            opt.task(lambda k: R.task_data(4)[k], R.loss_fn, name="task 4"):
        pass
    assert opt.task_in_progress is not None  # still pending, nothing changed
    assert all(torch.equal(p, q) for p, q in zip(model.adapt_parameters(), before))
    opt.discard_task_in_progress()  # as an aborted task: θ back to before it began
    restore = saved["opt"]["task_in_progress"]["restore"]["params"]
    assert all(torch.equal(p, q) for p, q in zip(model.adapt_parameters(), restore))
    assert opt.task_in_progress is None
    opt.meta_step()  # the finished task of the meta-batch is still there


def test_a_one_shot_task_resumes_with_an_iterator_after_the_batches_it_read():
    _, _, opt, _ = _interrupted("online-leap")  # task 3: a generator, stopped holding batch 2
    info = opt.task_in_progress
    assert info["kind"] == "one-shot" and info["batches_read"] == 3
    with pytest.raises(ValueError, match=r"one-shot data.*after the 3 it had read"), \
            opt.task(R.task_data(3), R.loss_fn, name="task 3"):
        pass
    with opt.task(R.source(3, read=3), R.loss_fn, name="task 3") as task:
        seen = [b for b in task]  # batch 2 (read, no step taken on it) comes again, then batch 3
    assert _equal(seen, R.task_data(3)[2:])


def test_an_invalid_in_task_checkpoint_is_refused_before_anything_changes():
    saved = _through_a_file(R.checkpoint("offline-leap"))
    _, opt = R.build("offline-leap", seed=7)
    tasks = [R.reattach(3)]
    before = opt.state_dict()
    sabotage = {
        "'task_in_progress.params'\\[0\\]": lambda r: r["params"].__setitem__(0, torch.zeros(2, 2).double()),
        "task_in_progress.trajectory.points\\[1\\].params": lambda r: r["trajectory"]["points"][1]["params"].pop(),
        "task_in_progress.hypers": lambda r: r["hypers"].pop(),
        "task_in_progress.restore_optimizer": lambda r: r["restore_optimizer"]["param_groups"].append({"params": []}),
        "a builtins.eval is not a state": lambda r: r["init_state"].update(module="builtins", namedtuple="eval"),
        "missing \\['finite'\\]": lambda r: r.pop("finite"),
        # fields read only when the task resumes: refused at load, not with a raw error later
        "task_in_progress.hypers\\[0\\]": lambda r: r["hypers"].__setitem__(0, {"x": 1}),
        "task_in_progress.trajectory.hypers": lambda r: r["trajectory"]["hypers"].__setitem__(0, [1]),
        "task_in_progress.task": lambda r: r["task"]["task_source"].__setitem__("drawn", "x"),
        "task_in_progress.task'.*kind 3": lambda r: r["task"].__setitem__("kind", 3),
        "task_in_progress.name": lambda r: r.__setitem__("name", 5),
        "task_in_progress.progress": lambda r: r["progress"].__setitem__("loop", "a"),
        "task_in_progress.algorithm_state.count": lambda r: r["algorithm_state"].__setitem__("count", "a"),
    }
    for match, damage in sabotage.items():
        bad = copy.deepcopy(saved["opt"])
        damage(bad["task_in_progress"])
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad, tasks=tasks)
        assert opt.task_in_progress is None and len(opt.replay) == 0
        assert _equal(opt.state_dict(), before)


def test_a_checkpoint_between_a_forward_and_the_step_is_refused():
    model, opt = R.build("offline-leap")
    x, y = R.task_data(0)[0]
    with opt.task(R.source(0), R.loss_fn, name="task 0"):
        opt.zero_grad()
        R.loss_fn(model(x), y).backward()
        with pytest.raises(RuntimeError, match=r"take it right after opt.step\(\)"):
            opt.state_dict()
        opt.step()
        assert opt.state_dict()["task_in_progress"]["steps"] == 1


@pytest.mark.parametrize("config", ["dropout-maml", "dropout-warp-maml"])
def test_maml_with_dropout_rebuilds_the_trajectory_with_the_loops_masks(config, monkeypatch):
    """The fresh-process test above checks the result bit for bit; here, what makes it so: each
    step's RNG state (and the pending Eq. 7 term's) is in the checkpoint, and without them (a
    checkpoint from before they were saved) the rebuild draws fresh masks, is warned and differs."""
    terms = []  # Warp-MAML: each pending Eq. 7 loss L_meta(θ_{k+1}; φ_k) when it is taken
    taken = warpopt.loop.Loop.warp_gradient

    def record(loop):
        if loop.pending is not None:
            terms.append((loop.task.name, loop.step_index, loop.pending[0].detach().clone()))
        return taken(loop)

    monkeypatch.setattr(warpopt.loop.Loop, "warp_gradient", record)
    reference = _reference(config)
    saved = _through_a_file(R.checkpoint(config))
    loop = saved["opt"]["task_in_progress"]["loop"]
    assert len(loop["rng"]) == R.CONFIGS[config][4]  # one state per step taken
    assert all(r["cpu"].dtype == torch.uint8 and r["cuda"] is None for r in loop["rng"])
    assert (loop["pending"] is not None) == (config == "dropout-warp-maml")
    i, k = R.CONFIGS[config][3:]
    live = [t for t in terms if t[:2] == (f"task {i}", k)]
    terms.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning any more
        resumed = R.resume(config, copy.deepcopy(saved))
    assert _equal(resumed["theta0"], reference["theta0"]) and _equal(resumed["phi"], reference["phi"])
    assert _equal([t for t in terms if t[:2] == (f"task {i}", k)], live)  # the rebuilt Eq. 7 term too
    old = copy.deepcopy(saved)
    del old["opt"]["task_in_progress"]["loop"]["rng"]
    with pytest.warns(RuntimeWarning, match="rebuilt with fresh dropout masks"):
        stale = R.resume(config, old)
    assert not _equal(stale["theta0"], reference["theta0"])
    if loop["pending"] is not None:  # the pending term's forward is drawn from its own state
        assert live
        old = copy.deepcopy(saved)
        old["opt"]["task_in_progress"]["loop"]["pending"]["rng"] = loop["rng"][0]  # another state
        terms.clear()
        R.resume(config, old)
        assert not _equal([t for t in terms if t[:2] == (f"task {i}", k)], live)


def test_a_malformed_maml_rng_state_is_refused_at_load():
    saved = _through_a_file(R.checkpoint("dropout-maml"))
    _, opt = R.build("dropout-maml", seed=7)
    before = [p.detach().clone() for p in opt.theta0]
    for bad, match in (
        (lambda loop: loop["rng"].pop(), r"loop.rng'.*one RNG state per step taken \(2\)"),
        (lambda loop: loop["rng"][1].update(cpu=torch.zeros(3)), r"loop.rng\[1\]'.*uint8"),
    ):
        entry = copy.deepcopy(saved["opt"])
        bad(entry["task_in_progress"]["loop"])
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(entry, tasks=[R.reattach(3)])
        assert _equal([p.detach() for p in opt.theta0], before)


def test_a_resume_that_fails_midway_leaves_the_model_as_it_was_and_the_task_pending():
    reference = _reference("offline-maml")
    saved, model, opt, _ = _interrupted("offline-maml")  # task 4 (a list) after 3 steps
    before = [p.detach().clone() for p in model.adapt_parameters()]
    state = copy.deepcopy(opt.task_optimizer.state_dict())
    bad = [(torch.zeros(5, 7, dtype=torch.float64), y) for _, y in R.task_data(4)]  # wrong width
    with pytest.raises(RuntimeError), opt.task(bad, R.loss_fn, name="task 4"):  # MAML's rebuild runs on them
        pass
    assert opt.task_in_progress is not None and opt._run is None
    assert all(torch.equal(p, q) for p, q in zip(model.adapt_parameters(), before))
    assert _equal(opt.task_optimizer.state_dict(), state)
    assert all(p.requires_grad for p in model.warp_parameters())  # φ not left frozen
    R.adapt(opt, model, 4, resume=saved)  # the right data: continued as if nothing happened
    result = R.result(opt, model, list(saved["losses"]) + R.run(opt, model, start=5))
    assert _equal(result["theta0"], reference["theta0"]) and _equal(result["phi"], reference["phi"])


def _loader_run(stop: tuple | None = None, saved: dict | None = None, probe: bool = False):
    """Offline + Leap on a model with dropout, each task's data a ``DataLoader`` object; stopped
    (a checkpoint taken) after ``stop = (task, steps)``, or resumed from ``saved`` (in-task or
    between tasks). Returns the checkpoint, or φ and θ0 after the meta-step."""
    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(6, 1))
    model = warpopt.warp(net)
    init = warpopt.leap(loss="probe" if probe else "train")
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-2, algorithm=warpopt.offline(batch_size=2),
                                        initialisation=init)
    g = torch.Generator().manual_seed(3)
    loaders = [torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(20, 3, generator=g),
                                                                          torch.randn(20, 1, generator=g)),
                                           batch_size=5) for _ in range(2)]
    start = (0, 0)
    if saved is not None:
        running = saved["task_in_progress"]
        start = (1, 0) if saved["pending"] is not None and running is None else (int(running is not None), 0)
        opt.load_state_dict(saved, tasks=[warpopt.Task(loaders[0], R.loss_fn)] if saved["pending"] else None)
    for i in range(start[0], 2):
        with opt.task(loaders[i], R.loss_fn) as task:
            for k, (x, y) in enumerate(task, start=task.start_step):
                if k == 3:
                    break
                opt.zero_grad()
                R.loss_fn(model(x), y).backward()
                opt.step()
                if stop == (i, k + 1):
                    return opt.state_dict(include_rng=True)
        if stop == (i, "after"):
            return opt.state_dict(include_rng=True)
    opt.meta_step()
    return [p.detach().clone() for p in model.warp_parameters()] + [t.clone() for t in opt.meta.theta0]


@pytest.mark.parametrize("stop", [(1, 1), (1, 2), (0, "after")])
@pytest.mark.parametrize("probe", [False, True])
def test_a_dataloader_is_re_iterated_on_resume_without_drawing_from_the_global_rng(stop, probe):
    # Each iter(DataLoader) draws a base seed from the global RNG: re-iterating a loader to its
    # saved position on resume (the loop's pass, the draws' pass: Leap's probe) must not, or the
    # dropout masks after it shift.
    reference = _loader_run(probe=probe)
    resumed = _loader_run(saved=_through_a_file(_loader_run(stop=stop, probe=probe)), probe=probe)
    assert _equal(resumed, reference)


def test_resuming_with_other_data_is_refused_for_a_list_and_warned_for_other_re_iterables():
    model, opt = R.build("offline-leap")
    with opt.task(R.task_data(0), R.loss_fn, name="task 0") as task:
        for k, (x, y) in enumerate(task):  # the loop iterates the task: its batches are saved
            opt.zero_grad()
            R.loss_fn(model(x), y).backward()
            opt.step()
            if k == 1:
                saved = _through_a_file(opt.state_dict())
    model, opt = R.build("offline-leap", seed=7)
    opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="more than one pass over its 1 batches"), \
            opt.task(R.task_data(0)[:1], R.loss_fn, name="task 0"):  # (as a checkpoint in a second epoch)
        pass
    for wrong in (R.task_data(0)[2:], R.task_data(5)):  # advanced by hand (the task skips itself) / other data
        with pytest.raises(ValueError, match="does not start with the batches the loop took"), \
                opt.task(wrong, R.loss_fn, name="task 0"):
            pass
    assert opt.task_in_progress is not None  # still pending, nothing changed

    class Batches:  # a re-iterable that is not a sequence (as a DataLoader): seen only as the loop skips
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    with pytest.warns(RuntimeWarning, match="does not start with the batches the loop took"), \
            opt.task(Batches(R.task_data(5)), R.loss_fn, name="task 0") as task:
        for x, y in task:
            opt.zero_grad()
            R.loss_fn(model(x), y).backward()
            opt.step()


def test_maml_with_dropout_and_extra_forwards_and_draws_in_the_loop_resumes_bit_identically():
    """A loop that makes a second (no_grad) forward and draws from the RNG itself at each step:
    the rebuilt step draws what the forward its gradient came from drew, whatever came before."""
    data = [R.task_data(i) for i in range(2)]

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
        model = warpopt.warp(net.double())
        return model, warpopt.WarpGradMetaOptimizer(model, lr=0.1, initialisation=warpopt.maml())

    def steps(opt, model, batches):
        for x, y in batches:
            with torch.no_grad():
                model(x)  # a monitoring forward: draws masks the graph does not use
            torch.rand(7)  # and the loop's own draw
            opt.zero_grad()
            R.loss_fn(model(x), y).backward()
            opt.step()

    model, opt = build()
    for d in data:
        with opt.task(d, R.loss_fn):
            steps(opt, model, d)
    opt.meta_step()
    reference = [t.detach().clone() for t in opt.theta0]

    model, opt = build()
    with opt.task(data[0], R.loss_fn):
        steps(opt, model, data[0])
    with opt.task(data[1], R.loss_fn):
        steps(opt, model, data[1][:2])
        saved = _through_a_file({"opt": opt.state_dict(include_rng=True), "model": model.state_dict()})
    model, opt = build()
    torch.manual_seed(5)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"], tasks=[warpopt.Task(data[0], R.loss_fn)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.task(data[1], R.loss_fn) as task:
            assert task.start_step == 2
            steps(opt, model, data[1][2:])
    opt.meta_step()
    assert _equal([t.detach() for t in opt.theta0], reference)
