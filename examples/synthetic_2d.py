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

The paper's meta-training is already CPU-sized and runs unchanged in both modes; ``--quick``
evaluates on 100 held-out surfaces x 10 starts instead of 1000 x 10. results.json records wall
and CPU seconds of meta-training.
"""
from __future__ import annotations

import os

import torch
from torch import nn

import harness
import warpopt

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
    history = []
    for step in harness.bar(range(args.meta_steps), desc="synthetic_2d", unit="meta-step"):
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
EXTENT = 3.5  # every panel shows [-3.5, 3.5]^2 (the starts are drawn from [-3, 3]^2)


def _draw_path(ax, path, style, label, start_marker):
    """A path clipped to the window, its start marked; says so when the path leaves the window."""
    ax.plot(path[:, 0], path[:, 1], style, ms=3, lw=1, label=label)
    ax.plot(*path[0], start_marker, ms=8, mec="k", mew=0.8, zorder=5)
    return bool((path.abs() > EXTENT).any())


def plot(model, data, args, history):
    plt = harness.pyplot()

    # Fig. 5: held-out tasks 0..2; in each, the first start where gradient descent fails (as
    # the paper picks starts "such that standard gradient descent struggles"), else start 0.
    rows = []
    for t in range(min(3, args.eval_tasks)):
        idx = list(range(t * args.eval_starts, (t + 1) * args.eval_starts))
        failing = [i for i in idx if not data["gd_ok"][i]]
        rows.append(failing[0] if failing else idx[0])
    fig, axes = plt.subplots(2, len(rows), figsize=(4.7 * len(rows), 9.4), layout="constrained", squeeze=False)
    grid = torch.linspace(-EXTENT, EXTENT, 141, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx, gy], -1).reshape(-1, 2)
    omega = model.omega.cpu()
    with torch.no_grad():
        warped_points = omega(points)
    for col, i in enumerate(rows):
        c = data["coefficients"][i]
        native = surface(c, points).reshape(gx.shape)
        warped = surface(c, warped_points).reshape(gx.shape)
        # One colour scale per task for both spaces, so the two panels can be compared.
        lo, hi = float(torch.minimum(native.min(), warped.min())), float(torch.maximum(native.max(), warped.max()))
        levels = torch.linspace(lo, hi, 41).tolist()
        top, bottom = axes[0, col], axes[1, col]
        cs = top.contourf(gx, gy, warped, levels=levels, cmap="viridis")
        out_top = _draw_path(top, data["wg"][:, i], "m.-", "WarpGrad θ_k (from θ_0 = x0, ○)", "wo")
        top.set_title(f"task {col}: θ-space, f(Ω(θ))" + ("\n(the path leaves the window)" if out_top else ""),
                      fontsize=9)
        bottom.contourf(gx, gy, native, levels=levels, cmap="viridis")
        out_gd = _draw_path(bottom, data["gd"][:, i], "k.-", "gradient descent x_k (from x0, ○)", "wo")
        out_wg = _draw_path(bottom, data["wg_gamma"][:, i], "m.-", "WarpGrad Ω(θ_k) (from Ω(x0), □)", "ms")
        bottom.set_title(f"x-space, f(x): GD {'ok' if data['gd_ok'][i] else 'fails'}, "
                         f"WarpGrad {'ok' if data['wg_ok'][i] else 'fails'}"
                         + ("\n(a path leaves the window)" if out_gd or out_wg else ""), fontsize=9)
        for ax in (top, bottom):
            ax.set_xlim(-EXTENT, EXTENT)
            ax.set_ylim(-EXTENT, EXTENT)
            ax.set_aspect("equal")
        fig.colorbar(cs, ax=[top, bottom], shrink=0.6, label=f"loss, task {col}")
    axes[0, 0].legend(loc="lower left", fontsize=7)
    axes[1, 0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"Gradient descent (black) vs WarpGrad (magenta), {args.steps} steps at lr {args.lr:g}, same start "
                 "x0 (white circle).\nWarpGrad descends in θ (top; the warp Ω makes the loss f(Ω(θ))); its points "
                 "map to Ω(θ_k) in x-space (bottom), starting at Ω(x0) (magenta square), not at x0.", fontsize=10)
    fig.savefig(os.path.join(args.out, "trajectories.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    harness.plot_smoothed(ax, history, label="mean task loss")
    ax.set_xlabel("meta-step (one fresh surface each)")
    ax.set_ylabel(f"mean task loss over the {args.steps} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "meta_loss.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
NOTES = {"steps": "paper (100)", "lr": "paper (0.1)", "meta_steps": "paper (100)", "starts": "paper (10)",
         "hidden": "paper (30)", "meta_lr": "ours (paper: unstated)", "objective": "ours (paper: unstated)",
         "eval_tasks": "ours", "eval_starts": "ours", "grad_tol": "ours", "curvature_tol": "ours"}


def parser():
    p = harness.ExampleParser("synthetic_2d", __doc__, quick={"eval_tasks": 100},
                              quick_help="the paper's meta-training, 100 held-out surfaces")
    p.add_argument("--meta-steps", type=int, default=100, help="meta-steps, one fresh surface each")
    p.add_argument("--steps", type=int, default=100, help="gradient-descent steps per task")
    p.add_argument("--lr", type=float, default=0.1, help="task learning rate")
    p.add_argument("--meta-lr", type=float, default=0.01, help="Adam learning rate of the warp Ω")
    p.add_argument("--starts", type=int, default=10, help="random starts per meta-training surface")
    p.add_argument("--hidden", type=int, default=30, help="hidden units of the warp Ω")
    p.add_argument("--objective", choices=["exact", "approx"], default="exact", help="meta-objective: Eq. 7 or Eq. 8")
    p.add_argument("--eval-tasks", type=int, default=1000, help="held-out surfaces")
    p.add_argument("--eval-starts", type=int, default=10, help="random starts per held-out surface")
    p.add_argument("--grad-tol", type=float, default=1e-3, help="converged: gradient norm below this ...")
    p.add_argument("--curvature-tol", type=float, default=1e-2, help="... and smallest Hessian eigenvalue above this")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--verbose", action="store_true", help="print every meta-step")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    harness.start(args)
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
    harness.write_config(args, NOTES, algorithm="online (Algorithm 1)", task_optimizer="SGD", meta_optimizer="Adam",
                         initialisation="none (random x0 ~ U(-3, 3)^2 per start; paper)",
                         warp="residual zero-initialised tanh MLP: Ω starts as the identity (ours)", dtype="float64")
    log = harness.log if args.verbose else (lambda *_: None)

    before, _ = evaluate(model, args, torch.Generator().manual_seed(args.seed + 10_000))
    watch = harness.Stopwatch()
    with watch:
        history = meta_train(model, opt, args, gen, log)
    results, data = evaluate(model, args, eval_gen)
    results = {"held_out_starts": args.eval_tasks * args.eval_starts,
               "criterion": f"strict local minimum of f at the final point: |grad f| < {args.grad_tol} and "
                            f"lambda_min(Hessian f) > {args.curvature_tol}",
               **results, "warpgrad_before_meta_training": before["warpgrad"],
               "meta_train_seconds": watch.wall, "meta_train_cpu_seconds": watch.cpu, "meta_loss_history": history}
    harness.write_json(args.out, "results.json", results)
    if not args.no_plots:
        plot(model, data, args, history)
    gd, wg = results["gradient_descent"], results["warpgrad"]
    print(f"held-out starts reaching a local minimum in {args.steps} steps: "
          f"gradient descent {gd['fraction_reached_local_minimum']:.3f}, "
          f"WarpGrad {wg['fraction_reached_local_minimum']:.3f} "
          f"(mean final loss {gd['mean_final_loss']:.3f} vs {wg['mean_final_loss']:.3f}); "
          f"meta-training {watch.wall:.0f} s; outputs in {args.out}")
    return results


if __name__ == "__main__":
    harness.cli(main)
