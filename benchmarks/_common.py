"""Shared pieces of the benchmarks: the Omniglot model, synthetic tasks, timing helpers."""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

import warpopt


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (medians are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def omniglot_net(ways: int = 20, filters: int = 64) -> nn.Module:
    """The Omniglot learner: 4 × (conv 3×3, 64 filters, BatchNorm, ReLU, max-pool 2), linear head."""
    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, filters, 3, padding=1), nn.BatchNorm2d(filters), nn.ReLU(), nn.MaxPool2d(2)]
        channels = filters
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters, ways))


def warped_omniglot(device: torch.device, ways: int = 20) -> nn.Module:
    return warpopt.warp(omniglot_net(ways)).to(device)


def synthetic_task(device: torch.device, batch: int = 20, ways: int = 20, distinct: int = 8,
                   generator: torch.Generator | None = None) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """A batch source k -> (x, y) of 28×28 images (random, on the device): batch k is fixed."""
    xs = torch.randn(distinct, batch, 1, 28, 28, generator=generator).to(device)
    ys = torch.randint(0, ways, (distinct, batch), generator=generator).to(device)
    return lambda k: (xs[k % distinct], ys[k % distinct])


def adapt_task(opt, model: nn.Module, data: Callable, loss_fn: Callable, steps: int) -> None:
    """One recorded task: ``steps`` plain task-loop steps inside ``opt.task(data, loss_fn)``."""
    with opt.task(data, loss_fn):
        for k in range(steps):
            x, y = data(k)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
