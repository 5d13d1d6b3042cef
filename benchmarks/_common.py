"""Shared pieces of the benchmarks: models, synthetic tasks, interleaved timing, peak memory.

Every script times its contenders *interleaved* in one process (each repeat runs every contender
once, in an order rotated by one at every repeat, so drift in the machine's load hits them all
alike) and reports medians of the per-repeat ratios. On CUDA every timer is bracketed by
``torch.cuda.synchronize`` and peak memory is ``torch.cuda.max_memory_allocated``; on CPU peak
memory is the process's resident-set high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs) above the resident set before the call, after returning freed heap memory
to the OS (``malloc_trim``). tracemalloc is of no use here: it sees Python's allocator only,
not the tensors torch allocates.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Optional

import torch
from torch import nn

import warpopt

MiB = 2 ** 20


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats (medians are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return device


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not on every platform
        return "n/a"


def machine(device: torch.device) -> str:
    """One line naming the machine a figure was measured on (and how loaded it was)."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return (f"{where}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
            f"load average {load_average()} (1/5/15 min)")


# ---------------------------------------------------------------------------------------- models
def omniglot_net(ways: int = 20, filters: int = 64, running_stats: bool = True) -> nn.Module:
    """4 × (conv 3×3, ``filters`` filters, BatchNorm, ReLU, max-pool 2) + linear head (28×28 → 1×1).

    ``running_stats=False``: BatchNorm normalises with the statistics of each batch it sees
    (the few-shot MAML setting) and the model has no buffers.
    """
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1),
                   nn.BatchNorm2d(filters, track_running_stats=running_stats), nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def warped_omniglot(device: torch.device, ways: int = 20) -> nn.Module:
    """The multi-shot Omniglot learner warped with the default layers (|θ| = 113,236, |φ| = 147,712)."""
    return warpopt.warp(omniglot_net(ways)).to(device)


def mlp(widths: Iterable[int] = (784, 1024, 1024, 10)) -> nn.Sequential:
    """ReLU MLP; the default 784-1024-1024-10 has 1,863,690 parameters (the "1.86M MLP")."""
    widths = list(widths)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def count(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


# ----------------------------------------------------------------------------------------- data
def synthetic_task(device: torch.device, batch: int = 20, ways: int = 20, distinct: int = 8,
                   generator: Optional[torch.Generator] = None, shape: tuple[int, ...] = (1, 28, 28),
                   ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A batch source k -> (x, y) of random inputs of ``shape`` (on the device): batch k is fixed."""
    xs = torch.randn(distinct, batch, *shape, generator=generator).to(device)
    ys = torch.randint(0, ways, (distinct, batch), generator=generator).to(device)
    return lambda k: (xs[k % distinct], ys[k % distinct])


def adapt_task(opt, model: nn.Module, data: Callable, loss_fn: Callable, steps: int, **task_kwargs) -> None:
    """One task in the user's loop: ``steps`` plain steps inside ``opt.task(data, loss_fn)``."""
    with opt.task(data, loss_fn, **task_kwargs):
        for k in range(steps):
            x, y = data(k)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()


# --------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: int = 1, progress: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``repeats`` rounds, order rotated every round."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(contenders[name], device))
        if progress:
            print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repeats of the per-repeat ratio ``num / den``."""
    return median([a / b for a, b in zip(times[num], times[den])])


def quotient(a: float, b: float) -> float:
    """a / b, NaN when b is not positive (a CPU peak can read 0 when freed pages were reused)."""
    return a / b if b > 0 else float("nan")


# --------------------------------------------------------------------------------------- memory
_libc = None


def _trim() -> None:
    """Hand freed heap memory back to the OS so the next high-water mark starts low (glibc)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes ``fn()`` allocates above what is in use before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact). CPU: VmHWM − VmRSS after a trim
    (Linux only; also counts allocator retention and page granularity: indicative).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    _trim()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS
        f.write("5")
    start = _status("VmRSS:")
    fn()
    return _status("VmHWM:") - start


def peak_memories(contenders: dict[str, Callable[[], object]], repeats: int,
                  device: torch.device) -> dict[str, float]:
    """Median peak bytes of each contender over ``repeats`` interleaved rounds."""
    names = list(contenders)
    peaks: dict[str, list[int]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            peaks[name].append(peak_memory(contenders[name], device))
    return {name: median(v) for name, v in peaks.items()}
