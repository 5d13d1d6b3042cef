"""What every example shares: command line, data, outputs, progress, timing, model blocks, evaluation.

An example is a ``main(argv=None) -> dict`` put together from these pieces::

    parser = harness.ExampleParser("omniglot", __doc__, quick={"meta_steps": 105}, data="omniglot")
    parser.add_argument("--meta-steps", type=int, default=1000, help="meta-training steps")
    args = parser.parse_args(argv)       # --quick fills in the quick values the command line left open
    device = harness.start(args)         # threads, seed, device check, output folder, progress on/off
    harness.write_config(args, NOTES)    # config.json: every value, where it came from, the machine
    ...
    harness.write_json(args.out, "results.json", results)

and ends with ``if __name__ == "__main__": harness.cli(main)`` (a missing dataset becomes its
message and exit status 2, not a traceback). Every example therefore takes ``--seed --device
--quick --out --threads --no-progress``; those that read a dataset also take ``--data-root``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent
if (ROOT / "warpopt" / "__init__.py").is_file() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a checkout: the examples use the library beside them

from warpopt.data.download import OMNIGLOT_URL, download_omniglot  # noqa: E402

# ----------------------------------------------------------------------------------------- data
DATA_ENV = "WARPOPT_DATA"


@dataclass(frozen=True)
class Dataset:
    """Where a dataset comes from and the layouts its loader reads (each a set of paths; "dir/..." is a folder)."""

    title: str
    source: str
    licence: str
    fetch: str
    layouts: tuple[tuple[str, ...], ...]


DATASETS = {
    "omniglot": Dataset(
        "Omniglot", "Lake, Salakhutdinov & Tenenbaum (2015), https://github.com/brendenlake/omniglot",
        "MIT", f"the two official archives\n  {OMNIGLOT_URL}images_background.zip\n  "
               f"{OMNIGLOT_URL}images_evaluation.zip",
        (("images_background.zip", "images_evaluation.zip"),
         ("images_background/<Alphabet>/characterNN/*.png", "images_evaluation/<Alphabet>/characterNN/*.png"),
         ("images_background.npz", "images_evaluation.npz", "alphabets.tsv"))),
    "miniimagenet": Dataset(
        "miniImageNet", "Vinyals et al. (2016), split of Ravi & Larochelle (2017): "
        "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet (CSV files)",
        "ImageNet terms of access (non-commercial research and education)",
        "the Ravi & Larochelle split files train.csv, val.csv, test.csv and the 60 000 listed ImageNet "
        "JPEGs (image-net.org, ILSVRC-2012 train set) in images/, or the community's pickle caches "
        "mini-imagenet-cache-{train,validation,test}.pkl",
        (("mini-imagenet-cache-train.pkl", "mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-test.pkl"),
         ("train.csv", "val.csv", "test.csv", "images/*.jpg"))),
    "tieredimagenet": Dataset(
        "tieredImageNet", "Ren et al. (2018), https://github.com/renmengye/few-shot-ssl-public",
        "ImageNet terms of access (non-commercial research and education)",
        "the authors' pickles {train,val,test}_images_png.pkl and {train,val,test}_labels.pkl "
        "(links in the repository above)",
        (tuple(f"{s}_{kind}.pkl" for s in ("train", "val", "test") for kind in ("images_png", "labels")),)),
}


class DataNotFound(FileNotFoundError):
    """A dataset is not where the example looks; the message says what to fetch and where to put it."""


def data_root(name: str, given: Optional[str] = None) -> Path:
    """``given``, else ``$WARPOPT_DATA/<name>`` when the variable is set, else ``./data/<name>``."""
    if given:
        return Path(given).expanduser()
    base = os.environ.get(DATA_ENV)
    return (Path(base).expanduser() if base else Path("data")) / name


def data_present(name: str, root: Path) -> bool:
    def has(folder: Path, path: str) -> bool:  # "a/<...>" stands for the folder a
        return (folder / path.split("/")[0]).is_dir() if "/" in path else (folder / path).is_file()
    folders = [root, root / "omniglot-py"] if name == "omniglot" else [root]
    return any(all(has(f, p) for p in layout) for f in folders for layout in DATASETS[name].layouts)


def missing_data_message(name: str, root: Path) -> str:
    d = DATASETS[name]
    layouts = "\n".join(f"  - {', '.join(layout)}" for layout in d.layouts)
    text = (f"{d.title} not found in {root.resolve()}.\nFetch {d.fetch}\n({d.source}; licence: {d.licence})\n"
            f"and put them in {root.resolve()}/ in one of these layouts:\n{layouts}\n")
    if name == "omniglot":
        text += (f"The archives may stay zipped. `--download {root}` fetches them for you and checks their "
                 f"SHA-256 (nothing is ever downloaded without it).\n")
    return text + (f"Data elsewhere? Pass --data-root DIR, or set {DATA_ENV} to the folder that holds "
                   f"{name}/ (default: ./data/{name}).")


def require_data(name: str, root: Path) -> Path:
    """``root`` if the dataset is there in a layout its loader reads; :class:`DataNotFound` otherwise."""
    if not data_present(name, root):
        raise DataNotFound(missing_data_message(name, root))
    return root


def fetch_data(name: str, dest: Path) -> Path:
    """Fetch a dataset on request (``--download``): only Omniglot's public archives can be."""
    if name != "omniglot":
        raise DataNotFound(f"{DATASETS[name].title} cannot be downloaded automatically "
                           f"({DATASETS[name].licence}).\n" + missing_data_message(name, dest))
    with tqdm(total=None, unit="B", unit_scale=True, desc=f"download to {dest}", disable=_VIEW["off"]) as b:
        return download_omniglot(dest, progress=b.update)


# ------------------------------------------------------------------------------- command line
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (and its --quick value) after its help."""

    quick: Mapping[str, Any] = {}

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default is not argparse.SUPPRESS and "default" not in text:
            quick = self.quick.get(action.dest, argparse.SUPPRESS)
            extra = "" if quick is argparse.SUPPRESS else f"; --quick: {str(quick).replace('%', '%%')}"
            text += f" (default: %(default)s{extra})"
        return text


class ExampleParser(argparse.ArgumentParser):
    """An example's parser: the common options, defaults in ``--help``, quick values, value origins.

    ``quick`` maps option destinations to the values ``--quick`` uses unless the command line gives
    them. After parsing, ``args._origin[dest]`` is ``"command line"``, ``"--quick"`` or ``"default"``.
    ``data`` names the dataset read (adds ``--data-root``; ``"omniglot"`` also ``--download``); with
    ``data="--dataset"`` the example's own ``--dataset`` option names it.
    """

    def __init__(self, name: str, doc: Optional[str], *, quick: Optional[Mapping[str, Any]] = None,
                 quick_help: str = "", data: Optional[str] = None, threads: int = 1) -> None:
        super().__init__(prog=f"examples/{name}.py", description=doc, formatter_class=HelpFormatter,
                         allow_abbrev=False)
        self.quick, self.data = dict(quick or {}), data
        self.add_argument("--seed", type=int, default=0, help="random seed")
        self.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
        self.add_argument("--quick", action="store_true", help=f"the CPU mode{': ' + quick_help if quick_help else ''}")
        self.add_argument("--out", default=os.path.join("runs", name),
                          help="output folder: config.json, results.json, plots")
        self.add_argument("--threads", type=int, default=threads,
                          help="torch CPU threads per process (0: torch's choice; 1 is fastest for these "
                               "small models on a small or shared CPU)")
        self.add_argument("--no-progress", action="store_true", help="no progress bars")
        if data:
            where = "the --dataset's" if data == "--dataset" else data
            self.add_argument("--data-root", default=None,
                              help=f"the dataset folder (default: ${DATA_ENV}/<name> when {DATA_ENV} is set, "
                                   f"else ./data/<name>; <name> = {where})")
        if data == "omniglot":
            self.add_argument("--download", metavar="DIR", default=None,
                              help="fetch the official Omniglot archives into DIR (SHA-256 checked) and read "
                                   "them from there; nothing is downloaded without it (default: off)")

    def _get_formatter(self) -> argparse.HelpFormatter:
        formatter = super()._get_formatter()
        formatter.quick = getattr(self, "quick", {})  # type: ignore[attr-defined]
        return formatter

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        ns = super().parse_args(argv, namespace)
        given = self._given(argv)
        origin = {}
        for action in self._actions:
            if action.dest == "help":
                continue
            if action.dest in given:
                origin[action.dest] = "command line"
            elif ns.quick and action.dest in self.quick:
                setattr(ns, action.dest, copy.deepcopy(self.quick[action.dest]))
                origin[action.dest] = "--quick"
            else:
                origin[action.dest] = "default"
        if self.data:
            name = ns.dataset if self.data == "--dataset" else self.data
            if getattr(ns, "download", None):
                if ns.data_root and Path(ns.data_root).resolve() != Path(ns.download).resolve():
                    self.error("--download DIR reads the data from DIR: leave out --data-root or give the same folder")
                ns.data_root = ns.download
            ns.data_root = str(data_root(name, ns.data_root))
        ns._origin, ns._argv, ns._name = origin, argv, self.prog
        return ns

    def _given(self, argv: Sequence[str]) -> set[str]:
        given = set()
        for token in argv:
            if token == "--":
                break
            action = self._option_string_actions.get(token.split("=", 1)[0])
            if action is not None:
                given.add(action.dest)
        return given


def cli(main: Callable[..., Any]) -> None:
    """Run an example's ``main()`` from the command line: a missing dataset exits 2 with its message."""
    try:
        main()
    except DataNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


_VIEW = {"off": False, "nested": 0}  # progress bars: off (--no-progress); nested under reproduce.py's


def start(args: argparse.Namespace) -> torch.device:
    """Common set-up: device check, torch threads, seed, output folder, progress bars on or off."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available to torch {torch.__version__}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    _VIEW["off"] = bool(getattr(args, "no_progress", False))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return device


# ------------------------------------------------------------------------------- outputs
def values(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def machine(device: str = "cpu") -> dict:
    info = {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def write_json(folder: str | Path, name: str, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``folder/name`` atomically (a reader never sees half a file)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)
    return path


def write_config(args: argparse.Namespace, notes: Optional[Mapping[str, str]] = None, **extra: Any) -> dict:
    """``config.json``: every value used, and for each its origin and what the paper/original use.

    ``sources[key]`` is ``"<origin>"`` or ``"<origin> — <note>"``: origin is ``command line``,
    ``--quick``, ``default``, or ``fixed`` for the ``extra`` values the example sets itself.
    """
    notes = notes or {}
    config = {**values(args), **extra}
    origin = getattr(args, "_origin", {})
    config["sources"] = {k: origin.get(k, "fixed") + (f" — {notes[k]}" if k in notes else "") for k in config}
    config["command"] = f"python {getattr(args, '_name', 'examples/?.py')} {shlex.join(getattr(args, '_argv', []))}"
    config["machine"] = machine(args.device)
    write_json(args.out, "config.json", config)
    return config


# ------------------------------------------------------------------------------- progress
def bar(iterable: Optional[Iterable] = None, **kwargs: Any) -> tqdm:
    """A tqdm bar that follows ``--no-progress`` and nests under ``reproduce.py``'s overall bar."""
    kwargs.setdefault("disable", _VIEW["off"])
    if _VIEW["nested"]:
        kwargs.setdefault("position", _VIEW["nested"])
        kwargs.setdefault("leave", False)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def log(message: str) -> None:
    """Print above the progress bars."""
    tqdm.write(message)


@contextlib.contextmanager
def nested_progress() -> Iterator[None]:
    """Examples run inside draw their bars one line below the caller's bar (one progress view)."""
    _VIEW["nested"] += 1
    try:
        yield
    finally:
        _VIEW["nested"] -= 1


def no_progress(n: int) -> None:
    """The ``progress`` of a run that nobody watches."""


def _call(packed: tuple) -> Any:
    worker, job, queue, threads = packed
    torch.set_num_threads(threads)
    _VIEW["off"] = True  # a worker reports through ``progress``; bars of its own would garble the parent's
    return worker(job, queue.put)


def run_parallel(worker: Callable[[Any, Callable[[int], None]], Any], jobs: Sequence[Any], *, workers: int,
                 total: int, desc: str, unit: str = "step", threads: int = 1) -> Iterator[Any]:
    """Yield ``worker(job, progress)`` for every job as runs finish, ``workers`` processes at a time.

    ``worker`` is a module-level function (spawned processes import it) that calls ``progress(n)``
    as it advances and returns a picklable result; runs share no state, so a result does not
    depend on how many processes ran. With ``workers <= 1`` (or one job) the runs go in this
    process, in order; otherwise in spawned processes with ``threads`` torch threads each.
    """
    with bar(total=total, desc=desc, unit=unit) as b:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield worker(job, b.update)
            return
        ctx = mp.get_context("spawn")
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the pool terminates its workers
        with ctx.Manager() as manager, ctx.Pool(min(workers, len(jobs))) as pool:
            queue = manager.Queue()
            pending = pool.imap_unordered(_call, [(worker, job, queue, threads) for job in jobs])
            for _ in jobs:
                while True:
                    try:
                        result, done = pending.next(timeout=0.5), True
                    except mp.TimeoutError:
                        done = False
                    while not queue.empty():
                        b.update(queue.get())
                    if done:
                        break
                yield result
            pool.close()  # let the workers exit on their own (terminating them leaks their semaphores)
            pool.join()


# ------------------------------------------------------------------------------- timing, fair comparisons
class Stopwatch:
    """Wall and CPU seconds (this process, all its threads) spent inside ``with watch:`` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


class Checkpoint(NamedTuple):
    state: Any
    steps: int
    cpu_s: float
    wall_s: float


def train_for_comparison(step: Callable[[], Any], snapshot: Callable[[], Any], *, steps: int,
                         budget: Optional[Callable[[], Optional[float]]] = None, max_steps: Optional[int] = None,
                         progress: Callable[[int], None] = no_progress) -> dict:
    """Meta-train with ``step()`` and keep the states two fair comparisons need.

    ``"equal_steps"``: ``snapshot()`` after ``steps`` meta-steps. ``"equal_time"`` (only with a
    ``budget``): training goes on until the CPU seconds spent in ``step`` reach ``budget()`` (the
    training time of the method compared against; ``None`` while not yet known, e.g. still running
    in another process), and the snapshot whose CPU time is nearest to it is kept; ``max_steps``
    (default 20 × ``steps``) caps the run. ``None`` when the budget is below the equal-steps time.
    """
    watch, max_steps = Stopwatch(), max_steps or 20 * steps
    for _ in range(steps):
        with watch:
            step()
        progress(1)
    out = {"equal_steps": Checkpoint(snapshot(), steps, watch.cpu, watch.wall), "equal_time": None}
    if budget is None:
        return out
    kept, n = [out["equal_steps"]], steps
    while True:
        limit = budget()
        if limit is not None:
            kept = [c for c in kept if c.cpu_s <= limit][-1:] + [c for c in kept if c.cpu_s > limit][:1]
            if watch.cpu >= limit or n >= max_steps:
                break
        elif n >= max_steps:
            break
        with watch:
            step()
        n += 1
        progress(1)
        kept.append(Checkpoint(snapshot(), n, watch.cpu, watch.wall))
    limit = budget()
    if limit is not None and limit >= out["equal_steps"].cpu_s:
        out["equal_time"] = min(kept, key=lambda c: abs(c.cpu_s - limit))
    return out


# ------------------------------------------------------------------------------- model blocks
class ConvBlock(nn.Module):
    """3x3 conv (padding 1) -> BatchNorm -> ReLU with 2x2 max-pooling, as the two protocols place it.

    ``pool="conv"``: right after the conv, conv -> pool -> BN -> ReLU (Leap/WarpGrad Omniglot,
    Appendix E); ``pool="last"``: conv -> BN -> ReLU -> pool (MAML's block, Appendix H); ``None``:
    no pooling. ``batch_stats``: BN always normalises with the batch it sees (no running statistics,
    the few-shot MAML setting). ``[B, c_in, H, W] -> [B, c_out, H', W']``.
    """

    def __init__(self, c_in: int, c_out: int, *, pool: Optional[str] = "last", batch_stats: bool = False) -> None:
        super().__init__()
        if pool not in ("conv", "last", None):
            raise ValueError(f"pool must be 'conv', 'last' or None, got {pool!r}")
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm = nn.BatchNorm2d(c_out, track_running_stats=not batch_stats)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.pool_after_conv, self.out_channels = pool == "conv", c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_after_conv:
            return self.relu(self.norm(self.pool(self.conv(x))))
        return self.pool(self.relu(self.norm(self.conv(x))))


class ConvNet(nn.Module):
    """``len(channels)`` :class:`ConvBlock` s (the first ``pools`` pool) and a linear head.

    ``[B, in_channels, S, S] -> [B, num_classes]``; ``embed(x)`` is the flattened features.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], num_classes: int, image_size: int,
                 pools: Optional[int] = None, *, pool: str = "last", batch_stats: bool = False) -> None:
        super().__init__()
        pools = len(channels) if pools is None else pools
        blocks, c_in, size = [], in_channels, image_size
        for i, c_out in enumerate(channels):
            blocks.append(ConvBlock(c_in, c_out, pool=pool if i < pools else None, batch_stats=batch_stats))
            c_in, size = c_out, (size // 2 if i < pools else size)
        self.features = nn.Sequential(*blocks)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# ------------------------------------------------------------------------------- evaluation
Batches = Callable[[int], tuple]  # k -> (x, y), the task's k-th training batch


def evaluate(model: nn.Module, theta0: Mapping[str, torch.Tensor], tasks: Iterable[tuple[Batches, tuple]], *,
             steps: int, lr: float, momentum: float = 0.0, total: Optional[int] = None, desc: str = "evaluate",
             make_optimizer: Optional[Callable] = None, on_step: Optional[Callable] = None) -> dict:
    """Adapt a copy of ``model`` from θ0 by SGD on each task, then score it on the task's held-out data.

    ``theta0`` maps the names of the parameters that adapt to their start values; every other
    parameter (warps, meta-learned blocks) stays fixed. ``tasks`` yields ``(batches, (x_test,
    y_test))``. BatchNorm uses batch statistics throughout (train mode). The same code for every
    method. Returns per-task test ``accuracy`` (fractions) and ``train_curves`` (training-batch
    accuracy at each of the ``steps`` steps). ``make_optimizer(model, params, lr)`` replaces SGD
    (e.g. KFAC); ``on_step(model, (x_test, y_test), k)`` runs after step k (1-based).
    """
    accuracy, curves = [], []
    for batches, (x_test, y_test) in bar(tasks, total=total, desc=desc, unit="task"):
        m = copy.deepcopy(model)
        params = dict(m.named_parameters())
        with torch.no_grad():
            for name, value in theta0.items():
                params[name].copy_(value)
        for name, p in params.items():
            p.requires_grad_(name in theta0)
        trainable = [params[n] for n in theta0]
        opt = (make_optimizer(m, trainable, lr) if make_optimizer is not None
               else torch.optim.SGD(trainable, lr=lr, momentum=momentum))
        m.train()
        curve = []
        for k in range(steps):
            x, y = batches(k)
            out = m(x)
            opt.zero_grad()
            F.cross_entropy(out, y).backward()
            opt.step()
            curve.append((out.argmax(1) == y).float().mean())
            if on_step is not None:
                on_step(m, (x_test, y_test), k + 1)
        with torch.no_grad():
            accuracy.append((m(x_test).argmax(1) == y_test).float().mean().item())
        curves.append(torch.stack(curve).tolist() if curve else [])
    return {"accuracy": accuracy, "train_curves": curves}


def mean_ci95(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and 95 % confidence half-width 1.96 · std (ddof 1) / √n (NaN for one value)."""
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), (1.96 * float(a.std(ddof=1)) / math.sqrt(len(a)) if len(a) > 1 else float("nan"))


# ------------------------------------------------------------------------------- plots
def smooth(y: Sequence[float], window: int) -> np.ndarray:
    """Trailing running mean (the window shrinks at the start)."""
    y = np.asarray(y, dtype=float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - max(1, window))
    return (c[idx] - c[lo]) / (idx - lo)


def plot_smoothed(ax: Any, y: Sequence[float], x: Optional[Sequence[float]] = None, *, window: Optional[int] = None,
                  label: Optional[str] = None, color: Optional[str] = None) -> None:
    """Raw values faint, their trailing mean (``window``: a tenth of the points by default) on top."""
    x = np.arange(1, len(y) + 1) if x is None else np.asarray(x)
    window = window or max(1, len(y) // 10)
    line, = ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
    ax.plot(x, smooth(y, window), color=line.get_color(), lw=1.8,
            label=f"{label} ({window}-point mean)" if label else f"{window}-point mean")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
