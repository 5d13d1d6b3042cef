"""Warping 2-D loss surfaces (Appendix D, Figures 2 and 5 of the WarpGrad paper).

Each task is a random surface (Appendix D)

    f(x1, x2) = b1 (a1 − x1)² exp(−x1² − (x2 + a2)²) − b2 (x1/s − x1³ − x2⁵) exp(−x1² − x2²)
                − b3 exp(−(x1 + a3)² − x2²),
    s ~ Cat(1..10), a_i ~ Cat(−1, 0, 1), b_i ~ Cat(−5..5),

minimised by 100 steps of gradient descent (lr 0.1) from x0 ~ U(−3, 3)². The "model" is the
point θ ∈ R² (adapt parameters); an explicit warp Ω (2-layer tanh MLP, 30 hidden units; ours:
residual, γ = θ + MLP(θ), with a zero-initialised output layer so that Ω starts as the identity
and WarpGrad starts as plain gradient descent) maps θ to γ = Ω(θ), where the loss is taken:
L(θ; φ) = f_τ(Ω_φ(θ)). Ω is meta-learned online (Algorithm 1), 100 meta-steps, each a fresh
surface and a mini-batch of 10 random starts (one task whose θ holds the 10 starts as rows; the
loss is their sum, so each row takes exactly the gradient-descent step it would alone).

Outputs (``--out``): config.json, results.json (fraction of held-out starts that reach a local
minimum within 100 steps, gradient descent vs WarpGrad), trajectories.png (Fig. 5 style),
meta_loss.png.

    python examples/synthetic_2d.py --quick

The paper's schedule is already CPU-sized, so ``--quick`` runs it unchanged (it only documents
that); results.json records wall and CPU seconds of meta-training.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import sys

import torch
from torch import nn

try:
    import warpopt
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warpopt

DESCRIPTION = __doc__.split("\n\n")[0]


# ----------------------------------------------------------------------------- task family
def sample_surfaces(n: int, generator: torch.Generator) -> torch.Tensor:
    """n surfaces as rows [s, a1, a2, a3, b1, b2, b3] (Appendix D)."""
    s = torch.randint(1, 11, (n, 1), generator=generator)
    a = torch.randint(-1, 2, (n, 3), generator=generator)
    b = torch.randint(-5, 6, (n, 3), generator=generator)
    return torch.cat([s, a, b], dim=1).double()


def surface(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f_τ(x) for coefficient rows ``c`` (broadcast against the points ``x[..., 2]``)."""
    s, a1, a2, a3, b1, b2, b3 = c.unbind(-1)
    x1, x2 = x[..., 0], x[..., 1]
    t1 = b1 * (a1 - x1) ** 2 * torch.exp(-x1 ** 2 - (x2 + a2) ** 2)
    t2 = b2 * (x1 / s - x1 ** 3 - x2 ** 5) * torch.exp(-x1 ** 2 - x2 ** 2)
    t3 = b3 * torch.exp(-(x1 + a3) ** 2 - x2 ** 2)
    return t1 - t2 - t3


# ----------------------------------------------------------------------------- model
class WarpedPoint(nn.Module):
    """θ (one row per start) and the warp Ω; ``forward(coefficients)`` = Σ_rows f_τ(Ω(θ))."""

    def __init__(self, starts: int, hidden: int = 30) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(starts, 2))
        # Ω(θ) = θ + W2 tanh(W1 θ + c1) + c2 with W2, c2 = 0 at the start: Ω starts as the identity.
        self.omega = warpopt.MLPResidualWarp(2, 0, hidden=hidden)

    def forward(self, coefficients: torch.Tensor) -> torch.Tensor:
        return surface(coefficients, self.omega(self.theta)).sum()


def surface_loss(forward, batch):
    """The task's "data" is its surface: the batch is the coefficient row, the loss f_τ(Ω(θ))."""
    return forward(batch)


# ----------------------------------------------------------------------------- descent and criteria
def descend(coefficients: torch.Tensor, x0: torch.Tensor, steps: int, lr: float, warp=None) -> torch.Tensor:
    """Gradient descent on θ for f(warp(θ)) (identity warp: plain GD); all rows at once.

    Returns the θ trajectory [steps + 1, N, 2]. Rows are independent (the loss is a sum).
    """
    theta = x0.clone().requires_grad_(True)
    path = [theta.detach().clone()]
    for _ in range(steps):
        gamma = warp(theta) if warp is not None else theta
        (grad,) = torch.autograd.grad(surface(coefficients, gamma).sum(), theta)
        with torch.no_grad():
            theta -= lr * grad
        path.append(theta.detach().clone())
    return torch.stack(path)


def gradient_and_hessian(coefficients: torch.Tensor, x: torch.Tensor):
    """∇f and the smallest eigenvalue of ∇²f at each row of ``x``."""
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(surface(coefficients, x).sum(), x, create_graph=True)
    rows = [torch.autograd.grad(g[:, j].sum(), x, retain_graph=True)[0] for j in range(2)]
    hessian = torch.stack(rows, dim=1)  # [N, 2, 2]
    hessian = 0.5 * (hessian + hessian.transpose(1, 2))
    return g.detach(), torch.linalg.eigvalsh(hessian.detach())[:, 0]


def reached_minimum(coefficients, x, grad_tol, curvature_tol):
    """At a strict local minimum: ‖∇f‖ < grad_tol and λ_min(∇²f) > curvature_tol.

    The curvature test matters: away from the origin the surfaces are flat (every term decays
    like exp(−‖x‖²)), so a start in that plateau has ‖∇f‖ < 1e-3 without ever moving.
    """
    g, lam = gradient_and_hessian(coefficients, x)
    norm = g.norm(dim=1)
    return (norm < grad_tol) & (lam > curvature_tol), norm < grad_tol


# ----------------------------------------------------------------------------- meta-training
def meta_train(model, opt, args, gen, log):
    """Algorithm 1: accumulate the meta-gradient at every step, one warp update per meta-step."""
    from tqdm import tqdm

    history = []
    for step in tqdm(range(args.meta_steps), desc="meta-train", disable=args.no_progress):
        coefficients = sample_surfaces(1, gen)[0].to(args.device)
        starts = (torch.rand(args.starts, 2, generator=gen, dtype=torch.float64) * 6 - 3).to(args.device)
        with torch.no_grad():  # each task starts at its own random θ0 (not meta-learned)
            opt.theta0[0].copy_(starts)
        losses = []
        with opt.task(lambda k: coefficients, batch_loss=surface_loss):
            for _ in range(args.steps):
                opt.zero_grad()
                loss = model(coefficients)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        stats = opt.meta_step()
        history.append(sum(losses) / len(losses) / args.starts)
        log(f"meta-step {step}: mean task loss {history[-1]:.4f} {stats}")
    return history


def evaluate(model, args, gen):
    coefficients = sample_surfaces(args.eval_tasks, gen).repeat_interleave(args.eval_starts, 0).to(args.device)
    x0 = (torch.rand(len(coefficients), 2, generator=gen, dtype=torch.float64) * 6 - 3).to(args.device)
    gd = descend(coefficients, x0, args.steps, args.lr)
    omega = model.omega
    wg = descend(coefficients, x0, args.steps, args.lr, warp=omega)
    with torch.no_grad():
        wg_gamma = omega(wg.reshape(-1, 2)).reshape(wg.shape)
    out = {}
    for name, points in (("gradient_descent", gd[-1]), ("warpgrad", wg_gamma[-1])):
        strict, flat = reached_minimum(coefficients, points, args.grad_tol, args.curvature_tol)
        out[name] = {"fraction_reached_local_minimum": strict.double().mean().item(),
                     "fraction_gradient_norm_below_tol": flat.double().mean().item(),
                     "mean_final_loss": surface(coefficients, points).mean().item()}
    data = {"coefficients": coefficients.cpu(), "x0": x0.cpu(), "gd": gd.cpu(), "wg": wg.cpu(),
            "wg_gamma": wg_gamma.cpu(),
            "gd_ok": reached_minimum(coefficients, gd[-1], args.grad_tol, args.curvature_tol)[0].cpu(),
            "wg_ok": reached_minimum(coefficients, wg_gamma[-1], args.grad_tol, args.curvature_tol)[0].cpu()}
    return out, data


# ----------------------------------------------------------------------------- plots
def plot(model, data, args, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fig. 5: held-out tasks 0..2; in each, the first start where gradient descent fails (as
    # the paper picks starts "such that standard gradient descent struggles"), else start 0.
    rows = []
    for t in range(3):
        idx = list(range(t * args.eval_starts, (t + 1) * args.eval_starts))
        failing = [i for i in idx if not data["gd_ok"][i]]
        rows.append(failing[0] if failing else idx[0])
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    grid = torch.linspace(-3.5, 3.5, 141, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx, gy], -1).reshape(-1, 2)
    omega = model.omega.cpu()
    with torch.no_grad():
        warped_points = omega(points)
    for col, i in enumerate(rows):
        c = data["coefficients"][i]
        native = surface(c, points).reshape(gx.shape)
        warped = surface(c, warped_points).reshape(gx.shape)
        top, bottom = axes[0, col], axes[1, col]
        top.contourf(gx, gy, warped, levels=40, cmap="viridis")
        top.plot(data["wg"][:, i, 0], data["wg"][:, i, 1], "m.-", ms=3, lw=1, label="WarpGrad θ")
        top.set_title(f"warped surface f(Ω(θ)), task {col}")
        bottom.contourf(gx, gy, native, levels=40, cmap="viridis")
        bottom.plot(data["gd"][:, i, 0], data["gd"][:, i, 1], "k.-", ms=3, lw=1, label="gradient descent")
        bottom.plot(data["wg_gamma"][:, i, 0], data["wg_gamma"][:, i, 1], "m.-", ms=3, lw=1,
                    label="WarpGrad Ω(θ)")
        bottom.plot(*data["x0"][i], "wo", ms=6, label="x0")
        bottom.set_title(f"native surface f(x): GD {'ok' if data['gd_ok'][i] else 'fails'}, "
                         f"WarpGrad {'ok' if data['wg_ok'][i] else 'fails'}")
        for ax in (top, bottom):
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_aspect("equal")
    axes[1, 0].legend(loc="lower left", fontsize=8)
    axes[0, 0].legend(loc="lower left", fontsize=8)
    fig.suptitle("Gradient descent (black) vs WarpGrad (magenta), 100 steps at lr 0.1, same x0")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "trajectories.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("mean task loss over the 100 steps")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "meta_loss.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CPU mode: identical, the paper's schedule is CPU-sized")
    p.add_argument("--out", default=os.path.join("runs", "synthetic_2d"))
    p.add_argument("--meta-steps", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--meta-lr", type=float, default=0.01)
    p.add_argument("--starts", type=int, default=10)
    p.add_argument("--hidden", type=int, default=30)
    p.add_argument("--objective", choices=["exact", "approx"], default="exact")
    p.add_argument("--eval-tasks", type=int, default=100)
    p.add_argument("--eval-starts", type=int, default=10)
    p.add_argument("--grad-tol", type=float, default=1e-3)
    p.add_argument("--curvature-tol", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a 2-D problem: 1 is fastest)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    eval_gen = torch.Generator().manual_seed(args.seed + 10_000)  # held-out surfaces and starts
    torch.set_default_dtype(torch.float64)  # 2-D problem: float64 costs nothing and keeps 1e-3 meaningful
    try:
        model = WarpedPoint(args.starts, args.hidden).to(args.device)
    finally:
        torch.set_default_dtype(torch.float32)
    model = warpopt.warp(model, where=None, designate="omega")  # model partitioning: θ adapt, Ω warp
    opt = warpopt.WarpGradMetaOptimizer(
        model, lr=args.lr, meta_lr=args.meta_lr, algorithm=warpopt.online(),
        objective=warpopt.exact if args.objective == "exact" else warpopt.approx,
        initialisation=warpopt.none())
    sources = {"paper": ["steps", "lr", "meta_steps", "starts", "hidden", "algorithm", "task_optimizer",
                         "task family", "init U(-3,3)^2"],
               "ours": ["meta_lr (paper: unstated)", "residual zero-init warp (identity start)", "objective",
                        "eval_tasks", "eval_starts", "grad_tol", "curvature_tol", "float64"]}
    config = {**vars(args), "algorithm": "online (Algorithm 1)", "task_optimizer": "SGD",
              "meta_optimizer": "Adam", "initialisation": "none (random x0 per start)", "sources": sources}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    log = print if args.verbose else (lambda *_: None)

    before, _ = evaluate(model, args, torch.Generator().manual_seed(args.seed + 10_000))
    t0, c0 = time.time(), time.process_time()
    history = meta_train(model, opt, args, gen, log)
    train_time, train_cpu = time.time() - t0, time.process_time() - c0
    results, data = evaluate(model, args, eval_gen)
    results = {"held_out_starts": args.eval_tasks * args.eval_starts,
               "criterion": f"strict local minimum of f at the final point: |grad f| < {args.grad_tol} and "
                            f"lambda_min(Hessian f) > {args.curvature_tol}",
               **results, "warpgrad_before_meta_training": before["warpgrad"],
               "meta_train_seconds": train_time,
               "meta_train_cpu_seconds": train_cpu, "meta_loss_history": history}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if not args.no_plots:
        plot(model, data, args, history)
    gd, wg = results["gradient_descent"], results["warpgrad"]
    print(f"held-out starts reaching a local minimum in {args.steps} steps: "
          f"gradient descent {gd['fraction_reached_local_minimum']:.3f}, "
          f"WarpGrad {wg['fraction_reached_local_minimum']:.3f} "
          f"(mean final loss {gd['mean_final_loss']:.3f} vs {wg['mean_final_loss']:.3f}); "
          f"meta-training {train_time:.0f} s; outputs in {args.out}")
    return results


if __name__ == "__main__":
    main()
