"""Fault injection (issue 15): crafted files, shared and failing replay storage, mixed dtypes,
malformed Omniglot files and invalid maze input. Each fault must raise a clear error (naming the
file / value and the fix) before anything changes, or be handled without losing anything."""

from __future__ import annotations

import errno
import gc
import multiprocessing
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from queue import Empty

import numpy as np
import pytest
import torch
from torch import nn

import warpopt
from warpopt.data.safe_pickle import UnsafePickleError, load_pickle
from warpopt.points import flatten_point, unflatten_point
from warpopt.storage import DiskStorage

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    return warpopt.warp(net)


def _tasks(seed: int, n: int = 2, batches: int = 3) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        w = torch.randn(3, 1, generator=g, dtype=torch.float64)
        xs = [torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(batches)]
        tasks.append([(x, torch.sin(x @ w)) for x in xs])
    return tasks


def _adapt(opt, model, tasks) -> None:
    for data in tasks:
        with opt.task(data, nn.functional.mse_loss):
            for x, y in data:
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if not p.is_dir())


def _point(seed: int = 0, n: int = 50) -> warpopt.trajectory.Point:
    g = torch.Generator().manual_seed(seed)
    return flatten_point(1, [torch.randn(n, generator=g)], [{}], [])


# ---------------------------------------------------------------------------- loading never runs code


class _Payload:
    """Unpickling this object calls ``how(marker)``: it creates the marker file."""

    def __init__(self, how: str, marker: Path) -> None:
        self.how, self.marker = how, marker

    def __reduce__(self):
        if self.how == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch '{self.marker}'",)


def _mini(n: int = 4) -> dict:
    data = np.random.default_rng(0).integers(0, 256, (n, 84, 84, 3), dtype=np.uint8)
    return {"image_data": data, "class_dict": {"b": [1, 3], "a": [0, 2]}}


@pytest.mark.parametrize("how,refused", [("exec", "builtins.exec"), ("system", f"{os.system.__module__}.system")])
def test_malicious_pickles_run_nothing(tmp_path, how, refused):
    marker = tmp_path / "pwned"
    (tmp_path / "trusted").mkdir()
    mini = tmp_path / "mini-imagenet-cache-train.pkl"
    with open(mini, "wb") as f:  # a valid pool with the payload after the data
        pickle.dump({**_mini(), "extra": _Payload(how, marker)}, f)
    with open(tmp_path / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.array([0, 1]), "label_specific_str": _Payload(how, marker)}, f)
    with open(tmp_path / "val_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.array([0, 1])}, f)
    with open(tmp_path / "val_images_png.pkl", "wb") as f:
        pickle.dump([b"png", _Payload(how, marker)], f, protocol=2)
    loads = [(lambda: warpopt.data.load_miniimagenet(tmp_path, "train"), mini),
             (lambda: warpopt.data.load_tieredimagenet(tmp_path, "train"), tmp_path / "train_labels.pkl"),
             (lambda: warpopt.data.load_tieredimagenet(tmp_path, "val"), tmp_path / "val_images_png.pkl")]
    for load, path in loads:
        with pytest.raises(UnsafePickleError) as e:
            load()
        assert str(path) in str(e.value) and refused in str(e.value)
        assert isinstance(e.value, ValueError)
        assert not marker.exists()
    with open(mini, "rb") as f:  # the payload is live: plain pickle would have run it
        pickle.load(f)
    assert marker.exists()


def test_generated_and_python2_numpy1_pickles_still_load(tmp_path):
    mini = _mini()
    # What numpy 1 / Python 2 wrote: protocol 2, numpy.core module names, __builtin__ containers.
    raw = pickle.dumps({**mini, "extra": {1, 2}}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray").replace(b"builtins\n", b"__builtin__\n")
    assert b"numpy.core.multiarray" in raw and b"__builtin__" in raw
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(raw)
    pool = warpopt.data.load_miniimagenet(tmp_path, "test")
    assert pool.class_names == ["a", "b"]
    assert torch.equal(pool.images_of(1), torch.from_numpy(mini["image_data"][[1, 3]]).permute(0, 3, 1, 2) / 255)
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(2.5), "b": b"\x00\xff",
               "o": np.array([b"ab", np.frombuffer(b"xy", np.uint8)], dtype=object), "set": {1}, "c": 1j}
        path = tmp_path / f"p{proto}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=proto))
        got = load_pickle(path, "test data")
        assert np.array_equal(got["a"], obj["a"]) and got["b"] == obj["b"] and got["s"] == 2.5
        assert got["set"] == {1} and got["c"] == 1j and bytes(got["o"][1]) == b"xy"


# ---------------------------------------------------------------------------- no silent rounding


def test_mixed_dtype_point_round_trips_bit_exactly():
    p32 = torch.tensor([1.0, -2.5, 3.25e-3], dtype=torch.float32)
    p64 = torch.tensor([1.0 + 2.0 ** -40, -1e-300], dtype=torch.float64)  # not float32-representable
    p16 = torch.tensor([[0.5, 7.0]], dtype=torch.bfloat16)
    states = [{"step": torch.tensor(3.0), "exp_avg": p32 * 0.1},  # host-side step count
              {"step": torch.tensor(3.0), "exp_avg": p64 * 0.1},
              {"exp_avg": p16 * 2}]
    buffers = [torch.tensor(2 ** 60 + 1, dtype=torch.int64),  # float64 would round this counter
               torch.tensor([True, False]), torch.tensor([1.0 + 2.0 ** -50], dtype=torch.float64)]
    point = flatten_point(4, [p32, p64, p16], states, buffers)
    assert sorted(map(str, point.layout.dtypes)) == sorted(map(str, {torch.float32, torch.float64, torch.bfloat16,
                                                                    torch.int64, torch.bool}))
    assert len(point.vectors) == len(point.layout.dtypes)  # one cat per dtype, nothing more
    params, got_states, got_buffers = unflatten_point(point, torch.device("cpu"))
    for got, want in zip(params + got_buffers + [s[k] for s in got_states for k in s],
                         [p32, p64, p16] + buffers + [s[k] for s in states for k in s]):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    # Half-precision storage (dtype=) still down-casts parameters and moments only.
    half = flatten_point(4, [p32, p64, p16], states, buffers, dtype=torch.float16)
    params, got_states, got_buffers = unflatten_point(half, torch.device("cpu"))
    assert [p.dtype for p in params] == [torch.float32, torch.float64, torch.bfloat16]
    assert torch.equal(params[1], p64.half().double()) and not torch.equal(params[1], p64)
    assert int(got_buffers[0]) == 2 ** 60 + 1 and torch.equal(got_buffers[1], buffers[1])
    assert float(got_states[0]["step"]) == 3.0


class _MixedNet(nn.Module):
    """A float32 layer first, then a float64 one: a shared float32 vector would round the latter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5).double(), nn.Linear(5, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x.float())).double())))


@pytest.mark.parametrize("storage", ["device", "disk"])
def test_mixed_dtype_model_replays_bit_exactly(storage, tmp_path):
    torch.manual_seed(0)
    model = warpopt.warp(_MixedNet(), where=lambda name, m: name == "b")
    model.b.warp.double()
    store = warpopt.DiskStorage(str(tmp_path)) if storage == "disk" else warpopt.DeviceStorage()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, task_optimizer=torch.optim.Adam,
                                        replay=warpopt.ReplayBuffer(storage=store))
    _adapt(opt, model, _tasks(0, n=1))
    last = opt.replay.sample(len(opt.replay) - 1, torch.device("cpu"))
    live = list(model.adapt_parameters())
    assert {p.dtype for p in live} == {torch.float32, torch.float64}
    for got, want in zip(last.params, live):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for got, want in zip(last.states, opt.core.states()):  # what was recorded (step in θ's dtype)
        assert set(got) == set(want) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value)
    opt.meta_step()


# ---------------------------------------------------------------------------- replay storage


def test_put_many_is_all_or_nothing_when_a_write_fails(tmp_path, monkeypatch):
    storage = DiskStorage(str(tmp_path))
    kept = storage.put(_point(9))  # held before the failing call: must survive it
    real_write, calls = warpopt.storage._write_all, []

    def failing_write(fd, data):  # the third file fills the disk half-way
        calls.append(1)
        if len(calls) == 3:
            os.write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    monkeypatch.setattr(warpopt.storage, "_write_all", failing_write)
    with pytest.raises(OSError, match="No space left"):
        storage.put_many([_point(i) for i in range(5)])
    assert len(calls) == 3
    assert _files(tmp_path) == [os.path.relpath(kept.path, tmp_path)]  # no partial file, no tmp file
    monkeypatch.setattr(warpopt.storage, "_write_all", real_write)
    stored = storage.put_many([_point(i) for i in range(5)])  # the storage still works
    assert len(_files(tmp_path)) == 6
    for i, p in enumerate(stored):
        assert torch.equal(storage.get(p).vectors[0], _point(i).vectors[0])
    assert torch.equal(storage.get(kept).vectors[0], _point(9).vectors[0])
    storage.clear()
    assert not list(tmp_path.iterdir())


def test_a_real_write_limit_leaves_no_partial_file(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse the write part-way (EFBIG), like a full filesystem.
    storage = DiskStorage(str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as e:
            storage.put_many([_point(0, n=10), _point(1, n=100_000)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert e.value.errno == errno.EFBIG
    assert _files(tmp_path) == []
    storage.close()


def test_planted_symlinks_are_not_followed(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    storage = DiskStorage(str(tmp_path))
    directory = Path(storage.directory)
    assert directory.parent == tmp_path and directory.name.startswith("warpopt-replay-")
    assert (directory.stat().st_mode & 0o777) == 0o700
    (directory / ".point-000000000.pt.tmp").symlink_to(target)
    (directory / "point-000000001.pt").symlink_to(target)
    for _ in range(2):  # neither the temporary nor the final name is followed or overwritten
        with pytest.raises(FileExistsError, match="something else writes there"):
            storage.put(_point())
    assert target.read_text() == "precious"
    stored = storage.put(_point(3))  # the next free name works
    os.unlink(stored.path)
    os.symlink(target, stored.path)  # a file swapped for a symlink is not read either
    with pytest.raises(OSError, match="clear()"):
        storage.get(stored)
    stored = storage.put(_point(4, n=50))
    torch.save([torch.zeros(7)], stored.path)  # a file changed after it was written is refused
    with pytest.raises(ValueError, match=r"changed after it was written.*clear\(\)"):
        storage.get(stored)
    Path(stored.path).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"unreadable replay point file.*clear\(\)"):
        storage.get(stored)
    storage.clear()
    assert target.read_text() == "precious" and not directory.exists()


def test_each_storage_has_its_own_directory_and_removes_it(tmp_path):
    a, b = DiskStorage(str(tmp_path)), DiskStorage(str(tmp_path))
    pa, pb = a.put(_point(1)), b.put(_point(2))
    assert a.directory != b.directory and Path(pa.path).name == Path(pb.path).name
    assert torch.equal(a.get(pa).vectors[0], _point(1).vectors[0])
    assert torch.equal(b.get(pb).vectors[0], _point(2).vectors[0])
    a_dir, b_dir = a.directory, b.directory
    a.clear()
    assert not os.path.exists(a_dir) and os.path.isdir(b_dir)
    a.put(_point(3))  # a fresh directory after clear()
    assert os.path.isdir(a.directory) and a.directory != a_dir
    new_dir = a.directory
    del a, b
    gc.collect()
    assert not os.path.exists(new_dir) and not os.path.exists(b_dir)  # garbage-collected
    assert not list(tmp_path.iterdir())


def test_default_directory_and_forked_children(tmp_path):
    storage = DiskStorage()
    assert os.path.dirname(storage.directory) == tempfile.gettempdir()
    assert os.path.basename(storage.directory).startswith("warpopt-replay-")
    pid = os.fork()
    if pid == 0:  # the child inherits the finalizer but must not remove the parent's directory
        storage._finalizer()
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.isdir(storage.directory)
    directory = storage.directory
    storage.close()
    assert not os.path.exists(directory)


def test_directory_removed_at_interpreter_exit(tmp_path):
    code = textwrap.dedent(f"""
        import torch, warpopt
        from warpopt.points import flatten_point
        STORE = warpopt.DiskStorage({str(tmp_path)!r})  # a module global: alive until exit
        STORE.put(flatten_point(0, [torch.ones(3)], [{{}}], []))
        print(STORE.directory)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip().startswith(str(tmp_path)) and not os.path.exists(out.strip())
    assert not list(tmp_path.iterdir())


def test_vanished_directory_gives_a_clear_error_and_clear_recovers(tmp_path):
    import shutil

    model = _tiny_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-2,
                                        replay=warpopt.ReplayBuffer(storage=DiskStorage(str(tmp_path))))
    _adapt(opt, model, _tasks(0))
    directory = opt.replay.storage.directory
    phi = [p.detach().clone() for p in model.warp_parameters()]
    shutil.rmtree(directory)
    with pytest.raises(FileNotFoundError) as e:
        opt.meta_step()
    assert directory in str(e.value) and "vanished" in str(e.value) and "clear()" in str(e.value)
    assert all(torch.equal(p, q) for p, q in zip(model.warp_parameters(), phi))  # φ as it was
    with pytest.raises(FileNotFoundError, match="clear()"):  # recording into it fails as clearly
        _adapt(opt, model, _tasks(1, n=1))
    opt.replay.clear()
    _adapt(opt, model, _tasks(1))
    opt.meta_step()
    assert not all(torch.equal(p, q) for p, q in zip(model.warp_parameters(), phi))
    assert not list(tmp_path.iterdir())


def _train_offline(seed: int, parent: str, barrier=None, queue=None):
    """Meta-train a tiny warped model offline (2 meta-steps) with its points on disk in ``parent``."""
    torch.set_num_threads(1)
    model = _tiny_model()
    opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-2,
                                        replay=warpopt.ReplayBuffer(storage=DiskStorage(parent)))
    for step in range(2):
        _adapt(opt, model, _tasks(100 * seed + step))
        if barrier is not None:
            barrier.wait()  # both processes have written their points before either replays
        opt.meta_step()
        if barrier is not None:
            barrier.wait()
    phi = [p.detach().clone() for p in model.warp_parameters()]
    if queue is not None:
        queue.put((seed, [p.tolist() for p in phi]))
    return phi


def test_two_processes_sharing_a_directory_match_private_directories(tmp_path):
    shared = tmp_path / "shared"
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_train_offline, args=(seed, str(shared), barrier, queue)) for seed in (1, 2)]
    results: dict = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        while len(results) < len(procs):
            try:
                seed, phi = queue.get(timeout=0.5)
                results[seed] = phi
            except Empty:  # fail fast when a worker died
                codes = [p.exitcode for p in procs]
                assert all(c in (None, 0) for c in codes) and time.monotonic() < deadline, codes
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for seed in (1, 2):
        private = _train_offline(seed, str(tmp_path / f"private{seed}"))
        assert all(torch.equal(torch.tensor(a, dtype=torch.float64), b) for a, b in zip(results[seed], private))
    assert not any(torch.equal(torch.tensor(a), torch.tensor(b)) for a, b in zip(results[1], results[2]))
    assert not list(shared.iterdir())


# ---------------------------------------------------------------------------- Omniglot input checks

_TSV_HEADER = "set\talphabet\tfirst_char_id\tlast_char_id\tn_chars\n"
_TSV_OK = [("images_background", "Alpha", 1, 2), ("images_background", "Beta", 3, 4),
           ("images_evaluation", "Gamma", 5, 6)]


def _omniglot_npz(root: Path, masks=None, rows=_TSV_OK, drawings=(3, 3)) -> dict:
    """A tiny npz-form Omniglot: 4 + 2 characters of ``drawings`` 12x12 bool masks (True = white)."""
    rng = np.random.default_rng(0)
    masks = masks or {s: rng.random((n, d, 12, 12)) > 0.3 for s, n, d in
                      (("images_background", 4, drawings[0]), ("images_evaluation", 2, drawings[1]))}
    for s, images in masks.items():
        np.savez(root / f"{s}.npz", images=images)
    (root / "alphabets.tsv").write_text(_TSV_HEADER + "".join(
        f"{s}\t{a}\t{lo}\t{hi}\t{hi - lo + 1}\n" for s, a, lo, hi in rows))
    return masks


def test_omniglot_integer_masks_load_like_bool_masks(tmp_path):
    masks = _omniglot_npz(tmp_path)
    reference = warpopt.data.load_omniglot(tmp_path, image_size=12)
    assert set(reference.images.unique().tolist()) == {0.0, 1.0}  # binary at native size
    for dtype in (np.uint8, np.int64):
        _omniglot_npz(tmp_path, {s: m.astype(dtype) for s, m in masks.items()})
        assert torch.equal(warpopt.data.load_omniglot(tmp_path, image_size=12).images, reference.images)
    for bad in (masks["images_evaluation"].astype(np.uint8) * 255, masks["images_evaluation"] * 2 - 1):
        _omniglot_npz(tmp_path, {**masks, "images_evaluation": bad})
        with pytest.raises(ValueError, match=r"images_evaluation.npz.*mask"):
            warpopt.data.load_omniglot(tmp_path, image_size=12)
    _omniglot_npz(tmp_path, {**masks, "images_evaluation": masks["images_evaluation"].astype(np.float32)})
    with pytest.raises(ValueError, match=r"images_evaluation.npz.*float32"):
        warpopt.data.load_omniglot(tmp_path, image_size=12)


def test_omniglot_mismatched_drawing_counts(tmp_path):
    _omniglot_npz(tmp_path, drawings=(3, 2))
    with pytest.raises(ValueError, match=r"images_evaluation.npz.*images_background.npz.*number of drawings"):
        warpopt.data.load_omniglot(tmp_path, image_size=12)


@pytest.mark.parametrize("rows,message", [
    ([("images_background", "Alpha", 2, 1)] + _TSV_OK[1:], r"line 2 \('Alpha'\): empty character range 2..1; fix"),
    ([("images_background", "Alpha", 1, 3)] + _TSV_OK[1:], r"lines 2 and 3: .*'Alpha' \(1..3\) and 'Beta' \(3..4\) overlap"),
    (_TSV_OK[:2] + [("images_evaluation", "Gamma", 5, 7)], r"line 4 \('Gamma'\): character ids 5..7 are out of range"),
    ([_TSV_OK[0], ("images_background", "Alpha", 3, 4), _TSV_OK[2]], r"\['Alpha'\] are listed more than once"),
])
def test_omniglot_bad_alphabet_ranges(tmp_path, rows, message):
    _omniglot_npz(tmp_path, rows=rows)
    with pytest.raises(ValueError, match=r"alphabets.tsv") as e:
        warpopt.data.load_omniglot(tmp_path, image_size=12)
    assert re.search(message, str(e.value)), str(e.value)


def test_omniglot_n_chars_column_must_match_the_range(tmp_path):
    _omniglot_npz(tmp_path)
    text = (tmp_path / "alphabets.tsv").read_text().replace("Beta\t3\t4\t2", "Beta\t3\t4\t5")
    (tmp_path / "alphabets.tsv").write_text(text)
    with pytest.raises(ValueError, match=r"alphabets.tsv, line 3 \('Beta'\): n_chars is 5"):
        warpopt.data.load_omniglot(tmp_path, image_size=12)


def test_omniglot_cache_with_the_right_fingerprint_but_wrong_shape_is_rebuilt(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    _omniglot_npz(root)
    fresh = warpopt.data.load_omniglot(root, image_size=10, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    with np.load(cache_file) as z:
        fingerprint, images = z["fingerprint"], z["images"]
    assert "uint8" in str(fingerprint) and str(tuple(images.shape)) in str(fingerprint)
    for bad in (images[:3], images.astype(np.int16), images[:, :, :9, :9]):
        np.savez(cache_file, images=bad, fingerprint=fingerprint)
        again = warpopt.data.load_omniglot(root, image_size=10, cache_dir=cache)
        assert torch.equal(again.images, fresh.images)
        with np.load(cache_file) as z:  # and the cache was rewritten with the right array
            assert z["images"].shape == images.shape and z["images"].dtype == np.uint8


# ---------------------------------------------------------------------------- maze input checks


def test_maze_actions_must_be_integers_in_the_action_space():
    from warpopt.envs import MazeEnv, MazeVectorEnv

    env = MazeEnv(size=7)
    env.reset(seed=0)
    before = (env.agent_pos, env.elapsed_steps)
    for bad in (True, False, np.bool_(True), 2.0, 1.5, None, "1", [1], np.array([1]), np.array(1.0), 4, -1,
                torch.tensor([1])):
        with pytest.raises(ValueError, match=r"Discrete\(4\)"):
            env.step(bad)
    assert (env.agent_pos, env.elapsed_steps) == before  # nothing moved
    for good in (1, np.int64(1), np.array(1, dtype=np.int32)):
        env.step(good)
    assert env.elapsed_steps == 3
    venv = MazeVectorEnv(3, size=7)
    venv.reset(seed=0)
    for bad in (np.ones(3, dtype=bool), [True, 1, 2], np.ones(3), [1, 2, None], None, [1, 2], [[1, 2, 3]],
                np.array([0, 4, 1]), [1, [2], 3]):
        with pytest.raises(ValueError, match=r"shape \(3,\).*Discrete\(4\)"):
            venv.step(bad)
    assert venv.elapsed_steps == 0
    venv.step([1, 2, 3])
    venv.step(torch.tensor([0, 1, 2]))
    assert venv.elapsed_steps == 2


def test_maze_set_state_validates_positions():
    from warpopt.envs import MazeEnv, MazeVectorEnv

    env = MazeEnv(size=7)
    env.reset(seed=0)
    before = (env.agent_pos, env.goal_pos)
    for bad, message in [((1.7, 1.2), "two integers"), ((True, 3), "two integers"), ((3,), "two integers"),
                         ("ab", "two integers"), ((3, 3, 3), "two integers"), ((-1, 3), "outside the 7x7 maze"),
                         ((3, 7), "outside"), ((2, 2), "is a wall"), ((0, 3), "is a wall")]:
        with pytest.raises(ValueError, match=message):
            env.set_state(agent_pos=bad)
        with pytest.raises(ValueError, match=message):
            env.set_state(goal_pos=bad)
    assert (env.agent_pos, env.goal_pos) == before
    env.set_state(agent_pos=np.array([1, 1]), goal_pos=(np.int64(3), 3))
    assert (env.agent_pos, env.goal_pos) == ((1, 1), (3, 3))
    venv = MazeVectorEnv(2, size=7)
    venv.reset(seed=0)
    for bad in ([[1.5, 1], [3, 3]], [[1, 1]], [[True, 1], [3, 3]], [[1, 1], [3]]):
        with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
            venv.set_state(agent_pos=bad)
    with pytest.raises(ValueError, match="is a wall"):
        venv.set_state(agent_pos=[[1, 1], [2, 2]])
    venv.set_state(agent_pos=[[1, 1], [1, 3]], goal_pos=[[3, 3], [5, 5]])
    assert venv.agent_pos.tolist() == [[1, 1], [1, 3]]
