"""Few-shot Warp-MAML (WarpGrad Table 1, Appendix C/H) against MAML and first-order MAML.

Warp-MAML: J = L(φ) + λ C_MAML(θ0), trained online (Algorithm 1) with the exact objective
(Eq. 7). Each meta-step samples one N-way K-shot episode; the task adapts for 5 SGD steps on
the full support set (the task's data), and L_meta is the loss on the query set (the meta
data). φ (warp layers + the first conv block) and θ0 get one Adam update per meta-step.
Evaluation: 600 test episodes, L = 15 query images per class, mean accuracy with a 95 %
confidence interval.

Fair comparisons (``--equal-time``, on in quick mode): a Warp-MAML meta-step costs several MAML
steps, so every other meta-learner is evaluated twice: after as many meta-steps as Warp-MAML
(equal steps) and after training on until it has used Warp-MAML's meta-training CPU time (equal
time, measured in the same run).

    python examples/fewshot.py --dataset omniglot --quick --meta-learner warp-maml maml   # 5- and 20-way 1-shot
    python examples/fewshot.py --dataset miniimagenet --ways 5 --shots 1 --device cuda
    python examples/fewshot.py --dataset tieredimagenet --protocol multishot --device cuda
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import harness
import warpopt
from fewshot_models import backbone, load_warp_state, warp_convnet, warp_state
from warpopt.data import EpisodeSampler, load_miniimagenet, load_omniglot, load_tieredimagenet, vinyals_split

from fewshot_report import fig8

def parser():
    p = harness.ExampleParser("fewshot", __doc__, data="--dataset",
                              quick_help="Omniglot 5-way 1-shot (200 meta-steps) and 20-way 1-shot (120), 32 "
                                         "filters, no early stopping, equal-time runs (about 9 min on 2 cores)")
    p.add_argument("--dataset", choices=["omniglot", "miniimagenet", "tieredimagenet"], default="omniglot",
                   help="dataset")
    p.add_argument("--protocol", choices=["fewshot", "multishot"], default="fewshot",
                   help="multishot: the tieredImageNet 10-way 640-shot Warp-Leap protocol of Table 1 (default: fewshot)")
    p.add_argument("--ways", type=int, nargs="+", default=None,
                   help="N, several: one run each (default: 5; multishot 10; --quick: 5 20)")
    p.add_argument("--shots", type=int, default=None, help="K at evaluation (default: 1; multishot 640)")
    p.add_argument("--train-shots", type=int, default=None,
                   help="K during meta-training (default: ImageNet 5 for 1-shot, 15 for 5-shot, as the paper; "
                        "Omniglot: = K)")
    p.add_argument("--queries", type=int, default=None, help="L query images per class (default: 15; multishot 50)")
    p.add_argument("--train-queries", type=int, default=None,
                   help="L during meta-training (default: L; --quick: 5 beyond 5-way)")
    p.add_argument("--meta-learner", nargs="+", default=None, choices=["warp-maml", "maml", "fomaml", "warp-leap"],
                   help="one run each; the first warp-* one runs first and sets the equal-time budget "
                        "(default: warp-maml; multishot warp-leap)")
    p.add_argument("--filters", type=int, nargs="+", default=None,
                   help="filters per conv block (default: 128 x 4; multishot 64 64 160 160 256 256; --quick: 32 x 4)")
    p.add_argument("--image-size", type=int, default=None, help="image side (default: Omniglot 28, ImageNet 84)")
    p.add_argument("--meta-steps", type=int, default=None,
                   help="meta-training steps (default: 60000; multishot 2000; --quick: 5-way 200, more ways 120)")
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step (default: 1; multishot 5)")
    p.add_argument("--inner-steps", type=int, default=None, help="task steps (default: 5; multishot 100)")
    p.add_argument("--inner-batch", type=int, default=None,
                   help="task batch (default: the full support set; multishot 64)")
    p.add_argument("--lr", type=float, default=None,
                   help="task learning rate α (default: Omniglot 0.4, miniImageNet 0.01, multishot 0.1)")
    p.add_argument("--momentum", type=float, default=None, help="task momentum (default: 0; multishot 0.9)")
    p.add_argument("--meta-lr", type=float, default=None, help="Adam learning rate of φ and MAML's θ0 (default: 1e-3)")
    p.add_argument("--init-lr", type=float, default=None, help="λβ, Adam learning rate of θ0 in Warp-* (default: --meta-lr)")
    p.add_argument("--warp-after", choices=["conv", "block"], default="conv",
                   help="warp layer right after each conv layer (Appendix H) or after each block (Sec. 4.1)")
    p.add_argument("--objective", choices=["exact", "approx"], default="exact", help="Eq. 7 or Eq. 8")
    p.add_argument("--eval-episodes", type=int, default=None,
                   help="test episodes (default: 600; multishot 100; --quick: 5-way 600, more ways 300)")
    p.add_argument("--eval-steps", type=int, default=None, help="task steps at evaluation (default: --inner-steps)")
    p.add_argument("--val-every", type=int, default=None,
                   help="meta-validate every N meta-steps for early stopping, 0: never (default: 1000; multishot "
                        "100; --quick: 0)")
    p.add_argument("--val-episodes", type=int, default=100, help="validation episodes")
    p.add_argument("--curve-every", type=int, default=None,
                   help="Fig. 8 learning curves: query accuracy every N task steps (default: 0, off; multishot 10)")
    p.add_argument("--curve-episodes", type=int, default=None,
                   help="Fig. 8 meta-training curve: meta-test episodes evaluated at every --val-every "
                        "(default: 0; multishot 20)")
    p.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=None,
                   help="also evaluate the other meta-learners at the first warp-* learner's meta-training CPU "
                        "time (default: on with --quick, off otherwise)")
    p.add_argument("--cache-dir", default="runs/cache", help="resized-Omniglot cache")
    p.add_argument("--summarize", nargs="+", default=None, metavar="RUN_DIR",
                   help="only combine the results.json of earlier runs into --out (table and plot; default: off)")
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def resolve(args) -> dict:
    """Every hyper-parameter actually used, each with its source."""
    cfg, src = {}, {}

    def put(key, given, default, source):
        explicit = given is not None and args._origin.get(key, "command line") == "command line"
        cfg[key] = given if explicit else default
        src[key] = "command line" if explicit else f"{'--quick' if args.quick else 'default'} — {source}"

    multi = args.protocol == "multishot"
    omni = args.dataset == "omniglot"
    if multi and omni:
        raise SystemExit("--protocol multishot is the tieredImageNet/miniImageNet 10-way 640-shot protocol")
    put("ways", args.ways, [10] if multi else ([5, 20] if omni and args.quick else [5]), "paper (Appendix H)")
    put("shots", args.shots, 640 if multi else 1, "paper (Appendix H)")
    tr_shots = args.shots if args.shots is not None else cfg["shots"]
    put("train_shots", args.train_shots,
        tr_shots if (omni or multi) else {1: 5, 5: 15}.get(tr_shots, tr_shots),
        "paper (Appendix H: meta-train K=5 for 1-shot, 15 for 5-shot)" if not omni else "= shots (ours)")
    put("queries", args.queries, 50 if multi else 15, "paper (Appendix H)")
    quick = {w: w <= 5 for w in cfg["ways"]} if args.quick else {}
    per_ways = lambda small, big: {str(w): (small if ok else big) for w, ok in quick.items()}  # noqa: E731
    put("train_queries", args.train_queries, per_ways(cfg["queries"], 5) if args.quick else cfg["queries"],
        "= queries (paper)" if not args.quick else "ours (quick: 5 beyond 5-way)")
    put("meta_learner", args.meta_learner, ["warp-leap"] if multi else ["warp-maml"], "paper")
    quick_filters = [32, 32, 32, 32]
    put("filters", args.filters,
        [64, 64, 160, 160, 256, 256] if multi else (quick_filters if args.quick else [128] * 4),
        "paper (Appendix H)" if not args.quick else "ours (quick: smaller backbone)")
    put("image_size", args.image_size, 28 if omni else 84, "paper (84, ImageNet) / MAML (28, Omniglot)")
    put("meta_steps", args.meta_steps, 2000 if multi else (per_ways(200, 120) if args.quick else 60000),
        "paper (Appendix H)" if not args.quick else "ours (quick: 5-way 200, more ways 120)")
    put("meta_batch", args.meta_batch, 5 if multi else 1, "paper (Appendix H)")
    put("inner_steps", args.inner_steps, 100 if multi else 5, "paper (Appendix H)")
    put("inner_batch", args.inner_batch, 64 if multi else None, "paper (Appendix H; few-shot: full support)")
    put("lr", args.lr, 0.4 if omni else (0.1 if multi else 0.01),
        "MAML paper (Finn et al. 2017: 0.4 Omniglot, 0.01 miniImageNet); multishot: ours")
    put("momentum", args.momentum, 0.9 if multi else 0.0, "paper (Appendix H)")
    put("meta_lr", args.meta_lr, 1e-3, "MAML paper / Adam default (ours)")
    put("init_lr", args.init_lr, cfg["meta_lr"], "ours (λ = 1)")
    put("objective", args.objective, "exact", "paper (Eq. 7)")
    put("warp_after", args.warp_after, "conv", "paper (Appendix H)")
    put("warp_layer", None, "ConvWarp 3x3 (linear, identity init), filters = the conv's", "paper (Appendix H)")
    put("algorithm", None, "online (Algorithm 1)", "paper (Appendix H)")
    put("eval_episodes", args.eval_episodes, 100 if multi else (per_ways(600, 300) if args.quick else 600),
        "ours (multishot: not stated)" if multi else "paper (Appendix H)")
    put("eval_steps", args.eval_steps, cfg["inner_steps"], "= inner steps (ours)")
    put("val_every", args.val_every, 0 if args.quick else (100 if multi else 1000), "ours (early stopping, Appendix H)")
    put("val_episodes", args.val_episodes, 100, "ours")
    put("curve_every", args.curve_every, 10 if multi else 0, "ours (Fig. 8 learning curves)")
    put("curve_episodes", args.curve_episodes, 20 if multi else 0, "ours (Fig. 8 meta-training curve)")
    put("equal_time", args.equal_time, bool(args.quick), "ours: fair comparison at equal training time (issue 17)")
    for key in ("dataset", "protocol", "seed", "device", "quick", "threads", "no_progress", "out", "cache_dir",
                "data_root"):
        cfg[key], src[key] = getattr(args, key), args._origin[key]
    cfg["bn"] = "batch statistics (track_running_stats=False), learned scale/offset"
    src["bn"] = "paper (Appendix H) / MAML"
    cfg["sources"] = src
    return cfg


def per(cfg: dict, key: str, ways: int):
    """``cfg[key]``, or its entry for ``ways`` when it is a per-ways table (quick mode)."""
    value = cfg[key]
    return value[str(ways)] if isinstance(value, dict) else value


def load_pools(cfg) -> dict:
    root, size = harness.require_data(cfg["dataset"], Path(cfg["data_root"])), cfg["image_size"]
    if cfg["dataset"] == "omniglot":
        om = load_omniglot(root, image_size=size, cache_dir=cfg["cache_dir"])
        return vinyals_split(om)
    norm = None  # images in [0, 1]; BN after the first conv absorbs the scale
    if cfg["dataset"] == "miniimagenet":
        return {s: load_miniimagenet(root, s, normalize=norm, image_size=size) for s in ("train", "val", "test")}
    return {s: load_tieredimagenet(root, s, normalize=norm, image_size=size) for s in ("train", "val", "test")}


def in_channels(pools) -> int:
    return int(pools["train"].images_at(0, torch.tensor([0])).shape[1])


class Learner:
    """One meta-learner over one backbone: ``train_step(episodes)``, ``evaluate(episodes)``."""

    def __init__(self, kind: str, cfg: dict, ways: int, channels: int, device: torch.device) -> None:
        self.kind, self.cfg, self.device = kind, cfg, device
        net = backbone(channels, cfg["filters"], ways, cfg["image_size"]).to(device)
        self.momentum = cfg["momentum"]
        self.gen = torch.Generator().manual_seed(cfg["seed"] + 1)  # multi-shot support batches
        task_kwargs = {"momentum": self.momentum} if self.momentum else {}
        if kind in ("warp-maml", "warp-leap"):
            self.model = warp_convnet(net, cfg["warp_after"])
            self.opt = warpopt.WarpGradMetaOptimizer(
                self.model, lr=cfg["lr"], meta_lr=cfg["meta_lr"], init_lr=cfg["init_lr"],
                objective=warpopt.exact if cfg["objective"] == "exact" else warpopt.approx,
                algorithm=warpopt.online(),
                # warp-leap: multi-shot tasks draw a random batch per step, so ΔL on a probe batch
                # (the change of one function) rather than on consecutive training batches
                initialisation=warpopt.maml() if kind == "warp-maml" else warpopt.leap(loss="probe"),
                **task_kwargs)
            self.names = [n for n, _ in self.model.named_adapt_parameters()]
        else:  # MAML / FOMAML: θ0-only meta-learning of the plain net through the same optimizer
            self.model = net
            self.opt = warpopt.WarpGradMetaOptimizer(
                net, lr=cfg["lr"], meta_lr=cfg["meta_lr"], init_lr=cfg["meta_lr"], algorithm=warpopt.online(),
                initialisation=warpopt.maml() if kind == "maml" else warpopt.fomaml(), **task_kwargs)
            self.names = [n for n, _ in net.named_parameters()]
        self.model.train()

    def _support(self, ep, gen=None):
        bs, gen = self.cfg["inner_batch"], gen or self.gen
        if bs is None:
            return lambda k: (ep.support_x, ep.support_y)

        def draw(k):
            idx = torch.randint(ep.support_x.shape[0], (bs,), generator=gen).to(self.device)
            return ep.support_x[idx], ep.support_y[idx]
        return draw

    def train_step(self, episodes) -> float:
        episodes = [ep.to(self.device) for ep in episodes]
        losses = []
        for ep in episodes:
            support = self._support(ep)
            if self.cfg["inner_batch"] is None:  # few-shot: the query set is the meta data
                meta = lambda k, ep=ep: (ep.query_x, ep.query_y)  # noqa: E731
            else:  # multi-shot (Leap protocol): fresh training batches of the task
                meta = self._support(ep)
            with self.opt.task(support, F.cross_entropy, meta_data=meta):
                for k in range(self.cfg["inner_steps"]):
                    x, y = support(k)
                    self.opt.zero_grad()
                    loss = F.cross_entropy(self.model(x), y)
                    loss.backward()
                    self.opt.step()
                    losses.append(loss.item())
        self.opt.meta_step()
        return float(np.mean(losses))

    def theta0(self):
        return list(self.opt.theta0)

    def evaluate(self, sampler, seed, desc="test", curve_every=None) -> dict:
        """Mean query accuracy (%) over the sampler's episodes with its 95 % CI (``harness.evaluate``).

        ``curve_every``: also the query accuracy after steps e, 2e, ... (mean over episodes) as
        ``curve`` (Fig. 8 learning curves).
        """
        gen = torch.Generator().manual_seed(seed)  # multi-shot support batches
        episodes = ((self._support(ep, gen), (ep.query_x, ep.query_y)) for ep in (e.to(self.device) for e in sampler))
        theta0 = {n: t.detach() for n, t in zip(self.names, self.theta0())}
        curves: list[list[float]] = []

        def on_step(model, query, k):
            if k % curve_every == 0:
                if k == curve_every:  # a new episode
                    curves.append([])
                with torch.no_grad():
                    curves[-1].append((model(query[0]).argmax(-1) == query[1]).float().mean().item() * 100.0)

        out = harness.evaluate(self.model, theta0, episodes, steps=self.cfg["eval_steps"], lr=self.cfg["lr"],
                               momentum=self.momentum, total=len(sampler), desc=desc,
                               on_step=on_step if curve_every else None)
        acc = [100.0 * a for a in out["accuracy"]]
        mean, ci = harness.mean_ci95(acc)
        res = {"accuracy": mean, "ci95": ci, "episodes": len(acc), "per_episode": acc}
        if curve_every:
            res["curve"] = {"steps": list(range(curve_every, self.cfg["eval_steps"] + 1, curve_every)),
                            "accuracy": np.asarray(curves).mean(0).tolist()}
        return res

    def state(self):
        return warp_state(self.model, self.opt)

    def load(self, state):
        load_warp_state(self.model, self.opt, state)

    def counts(self) -> dict:
        if self.kind.startswith("warp"):
            return {"adapt": sum(p.numel() for p in self.model.adapt_parameters()),
                    "warp": sum(p.numel() for p in self.model.warp_parameters())}
        return {"adapt": sum(p.numel() for p in self.model.parameters()), "warp": 0}


def run_one(kind, ways, cfg, pools, device, budget=None) -> dict:
    """Meta-train one learner for one N and evaluate it on the test episodes.

    With a ``budget`` (CPU seconds) it trains on past ``meta_steps`` until it has used that much
    (``harness.train_for_comparison``) and is evaluated at both points (``"equal_time"``).
    """
    cfg = {**cfg, **{k: per(cfg, k, ways) for k in ("meta_steps", "train_queries", "eval_episodes")}}
    torch.manual_seed(cfg["seed"])
    learner = Learner(kind, cfg, ways, in_channels(pools), device)
    train = EpisodeSampler(pools["train"], ways, cfg["train_shots"], cfg["train_queries"], seed=cfg["seed"])
    val = EpisodeSampler(pools["val"], ways, cfg["shots"], cfg["queries"], seed=10_000 + cfg["seed"],
                         num_episodes=cfg["val_episodes"])
    test = EpisodeSampler(pools["test"], ways, cfg["shots"], cfg["queries"], seed=20_000 + cfg["seed"],
                          num_episodes=cfg["eval_episodes"])
    curve, val_curve, best = [], [], {"accuracy": -1.0, "state": None, "step": 0}
    test_curve, curve_test = [], None  # Fig. 8 (bottom): meta-test accuracy during meta-training
    if cfg["curve_episodes"]:
        curve_test = EpisodeSampler(pools["test"], ways, cfg["shots"], cfg["queries"], seed=30_000 + cfg["seed"],
                                    num_episodes=cfg["curve_episodes"])
    mb, steps = cfg["meta_batch"], cfg["meta_steps"]
    extra = round(steps * 2.8) if budget is not None else 0  # MAML runs ≈ 3.8x the steps in Warp-MAML's time
    bar = harness.bar(total=steps + extra, desc=f"{kind} {ways}-way {cfg['shots']}-shot", unit="meta-step")

    def step():
        n = len(curve)
        curve.append(learner.train_step([train.episode(n * mb + i) for i in range(mb)]))
        if n % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(curve[-50:]):.3f}")
        if cfg["val_every"] and (n + 1) % cfg["val_every"] == 0 and n < steps:  # early stopping (equal steps)
            acc = learner.evaluate(val, seed=1, desc="validation")["accuracy"]
            val_curve.append((n + 1, acc))
            if curve_test is not None:
                test_curve.append((n + 1, learner.evaluate(curve_test, seed=3, desc="meta-test curve")["accuracy"]))
            if acc > best["accuracy"]:
                best.update(accuracy=acc, state=learner.state(), step=n + 1)

    with bar:
        points = harness.train_for_comparison(step, learner.state, steps=steps, budget=(lambda: budget)
                                              if budget is not None else None, progress=bar.update)
    out = {"meta_learner": kind, "ways": ways, "shots": cfg["shots"], "meta_steps": steps,
           "train_seconds": round(points["equal_steps"].wall_s, 1), "train_cpu_s": points["equal_steps"].cpu_s,
           "best_val_step": best["step"] if best["state"] is not None else None, "val_curve": val_curve,
           "train_loss": curve[:steps], "train_loss_curve": [float(np.mean(curve[i:i + 50])) for i in range(0, steps, 50)],
           "parameters": learner.counts()}
    watch = harness.Stopwatch()
    with watch:
        learner.load(best["state"] if best["state"] is not None else points["equal_steps"].state)
        res = learner.evaluate(test, seed=2, curve_every=cfg["curve_every"] or None)
    out.update(accuracy=res["accuracy"], ci95=res["ci95"], test_episodes=res["episodes"],
               per_episode=res["per_episode"], eval_seconds=round(watch.wall, 1), protocol=cfg["protocol"],
               learning_curve=res.get("curve"), test_curve=test_curve)
    if points["equal_time"] is not None:
        point = points["equal_time"]
        learner.load(point.state)
        res = learner.evaluate(test, seed=2)
        out["equal_time"] = {"accuracy": res["accuracy"], "ci95": res["ci95"], "meta_steps": point.steps,
                             "train_cpu_s": round(point.cpu_s, 1), "train_seconds": round(point.wall_s, 1),
                             "budget_cpu_s": round(budget, 1), "train_loss": curve[steps:point.steps],
                             "per_episode": res["per_episode"]}
    return out


def plot(results, out: Path, cfg) -> None:
    plt = harness.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = []  # (label, accuracy, ci, colour, hatch)
    for r in results:
        name = f"{r['meta_learner']}\n{r['ways']}-way {r['shots']}-shot"
        bars.append((f"{name}\n{r['meta_steps']} steps", r["accuracy"], r["ci95"],
                     "C1" if r["meta_learner"].startswith("warp") else "C0", ""))
        if "equal_time" in r:
            e = r["equal_time"]
            bars.append((f"{name}\n{e['meta_steps']} steps\n(equal time)", e["accuracy"], e["ci95"], "C0", "//"))
    for i, (_, acc, ci, colour, hatch) in enumerate(bars):
        a.bar(i, acc, yerr=ci, capsize=4, color=colour, hatch=hatch, edgecolor="k" if hatch else None)
    a.set_xticks(range(len(bars)), [x[0] for x in bars], fontsize=7)
    a.set_ylabel("test accuracy (%) ± 95 % CI")
    episodes = cfg["eval_episodes"]
    episodes = "/".join(map(str, episodes.values())) if isinstance(episodes, dict) else episodes
    a.set_title(f"{cfg['dataset']}: {episodes} test episodes; hatched: equal training time", fontsize=9)
    for r in results:
        loss = r.get("train_loss") or r["train_loss_curve"]
        loss = loss + r.get("equal_time", {}).get("train_loss", [])
        harness.plot_smoothed(b, loss, label=f"{r['meta_learner']} {r['ways']}-way", window=max(1, len(loss) // 20))
    b.set_xlabel("meta-step")
    b.set_ylabel("task loss on the support set")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fewshot.png", dpi=120)
    plt.close(fig)


def summarize(dirs, out: Path) -> list:
    """Combine finished runs (each ``DIR/results.json``) into one table and plot."""
    results, datasets = [], set()
    for d in dirs:
        results += json.loads((Path(d) / "results.json").read_text())["results"]
        datasets.add(json.loads((Path(d) / "config.json").read_text())["dataset"])
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out, "results.json", {"runs": [str(d) for d in dirs], "results": results})
    episodes = sorted({r["test_episodes"] for r in results})
    plot(results, out, {"dataset": "/".join(sorted(datasets)), "eval_episodes": "/".join(map(str, episodes))})
    fig8(results, out)
    for r in results:
        print(describe(r))
    return results


def describe(r: dict) -> str:
    line = (f"{r['meta_learner']:10s} {r['ways']}-way {r['shots']}-shot, {r['meta_steps']} meta-steps "
            f"({r.get('train_cpu_s', float('nan')):.0f} CPU s): {r['accuracy']:.2f} ± {r['ci95']:.2f} % "
            f"({r['test_episodes']} episodes)")
    if "equal_time" in r:
        e = r["equal_time"]
        line += (f"; at equal training time ({e['budget_cpu_s']:.0f} CPU s): {e['meta_steps']} meta-steps, "
                 f"{e['accuracy']:.2f} ± {e['ci95']:.2f} %")
    return line


def main(argv=None) -> list:
    args = parse_args(argv)
    device = harness.start(args)
    if args.summarize:
        return summarize(args.summarize, Path(args.out))
    cfg = resolve(args)
    out = Path(args.out)
    harness.write_json(out, "config.json", {**cfg, "command": f"python examples/fewshot.py {' '.join(args._argv)}",
                                            "machine": harness.machine(args.device)})
    pools = load_pools(cfg)
    results = []
    # warp-* learners first: the first one's training time is the others' equal-time budget
    kinds = sorted(cfg["meta_learner"], key=lambda k: not k.startswith("warp"))
    for ways in cfg["ways"]:
        budget = None
        for kind in kinds:
            r = run_one(kind, ways, cfg, pools, device,
                        budget=budget if cfg["equal_time"] and not kind.startswith("warp") else None)
            if kind.startswith("warp") and budget is None:
                budget = r["train_cpu_s"]
            results.append(r)
            harness.log(describe(r) + f" (eval {r['eval_seconds']} s)")
            summary = [{k: v for k, v in x.items() if k != "per_episode"} for x in results]
            harness.write_json(out, "results.json", {"results": summary, "per_episode": {
                f"{x['meta_learner']}/{x['ways']}": x["per_episode"] for x in results}})
    plot(results, out, cfg)
    fig8(results, out)
    return results


if __name__ == "__main__":
    harness.cli(main)
