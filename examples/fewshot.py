"""Few-shot Warp-MAML (WarpGrad Table 1, Appendix C/H) against MAML and first-order MAML.

Warp-MAML: J = L(φ) + λ C_MAML(θ0), trained online (Algorithm 1) with the exact objective
(Eq. 7). Each meta-step samples one N-way K-shot episode; the task adapts for 5 SGD steps on
the full support set (the task's data), and L_meta is the loss on the query set (the meta
data). φ (warp layers + the first conv block) and θ0 get one Adam update per meta-step.
Evaluation: 600 test episodes, L = 15 query images per class, mean accuracy with a 95%
confidence interval.

    python examples/fewshot.py --dataset omniglot --quick --meta-learner warp-maml maml   # 5- and 20-way 1-shot
    python examples/fewshot.py --dataset miniimagenet --data-root DATA --ways 5 --shots 1 --device cuda
    python examples/fewshot.py --dataset tieredimagenet --data-root DATA --protocol multishot --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import warpopt  # noqa: E402
from warpopt.data import (EpisodeSampler, load_miniimagenet, load_omniglot, load_tieredimagenet,  # noqa: E402
                          vinyals_split)
from fewshot_models import (ConvNet, MAMLBaseline, evaluate, load_warp_state, warp_convnet,  # noqa: E402
                            warp_state)

DEFAULT_ROOTS = {"omniglot": "../shared/data/omniglot", "miniimagenet": "data/miniimagenet",
                 "tieredimagenet": "data/tieredimagenet"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["omniglot", "miniimagenet", "tieredimagenet"], default="omniglot")
    p.add_argument("--data-root", default=None, help="dataset folder (default: %s)" % DEFAULT_ROOTS)
    p.add_argument("--protocol", choices=["fewshot", "multishot"], default="fewshot",
                   help="multishot: tieredImageNet 10-way 640-shot Warp-Leap protocol of Table 1")
    p.add_argument("--ways", type=int, nargs="+", default=None, help="N (several: one run each)")
    p.add_argument("--shots", type=int, default=None, help="K at evaluation")
    p.add_argument("--train-shots", type=int, default=None,
                   help="K during meta-training (paper, ImageNet: 5 for 1-shot, 15 for 5-shot; Omniglot: = K)")
    p.add_argument("--queries", type=int, default=None, help="L query images per class")
    p.add_argument("--train-queries", type=int, default=None, help="L during meta-training (default: L)")
    p.add_argument("--meta-learner", nargs="+", default=None,
                   choices=["warp-maml", "maml", "fomaml", "warp-leap"], help="one run each")
    p.add_argument("--filters", type=int, nargs="+", default=None, help="filters per conv block")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--meta-steps", type=int, default=None)
    p.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-step")
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--inner-batch", type=int, default=None, help="task batch (multishot; default: full support)")
    p.add_argument("--lr", type=float, default=None, help="task learning rate α")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--meta-lr", type=float, default=None, help="Adam learning rate of φ (and MAML's θ0)")
    p.add_argument("--init-lr", type=float, default=None, help="λβ, Adam learning rate of θ0 in Warp-*")
    p.add_argument("--warp-after", choices=["conv", "block"], default="conv",
                   help="warp layer right after each conv layer (Appendix H) or after each block (Sec. 4.1)")
    p.add_argument("--objective", choices=["exact", "approx"], default="exact")
    p.add_argument("--eval-episodes", type=int, default=None, help="test episodes (600; multishot: 100)")
    p.add_argument("--eval-steps", type=int, default=None, help="task steps at evaluation (default: inner steps)")
    p.add_argument("--val-every", type=int, default=None, help="meta-validate every N meta-steps (0: never)")
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="CPU mode: 32 filters, 5-way 200 / 20-way 120 meta-steps (about 7 CPU-minutes for 2x2 runs)")
    p.add_argument("--out", default="runs/fewshot")
    p.add_argument("--cache-dir", default="runs/cache", help="resized-Omniglot cache")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --quick, where OpenMP oversubscription hurts)")
    p.add_argument("--summarize", nargs="+", default=None, metavar="RUN_DIR",
                   help="only combine the results.json of earlier runs into --out (table + plot)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve(args) -> dict:
    """Every hyper-parameter actually used, each with its source."""
    cfg, src = {}, {}

    def put(key, given, default, source):
        cfg[key] = given if given is not None else default
        src[key] = "command line" if given is not None else source

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
    put("cache_dir", args.cache_dir, "runs/cache", "ours")
    put("data_root", args.data_root, DEFAULT_ROOTS[args.dataset], "ours")
    for key in ("dataset", "protocol", "seed", "device", "quick"):
        cfg[key], src[key] = getattr(args, key), "command line"
    cfg["bn"] = "batch statistics (track_running_stats=False), learned scale/offset"
    src["bn"] = "paper (Appendix H) / MAML"
    cfg["sources"] = src
    return cfg


def per(cfg: dict, key: str, ways: int):
    """``cfg[key]``, or its entry for ``ways`` when it is a per-ways table (quick mode)."""
    value = cfg[key]
    return value[str(ways)] if isinstance(value, dict) else value


def load_pools(cfg) -> dict:
    root, size = cfg["data_root"], cfg["image_size"]
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
        filters = cfg["filters"]
        pools = len(filters) if len(filters) <= 4 else len(filters) - 1
        net = ConvNet(channels, filters, ways, cfg["image_size"], pools=pools).to(device)
        self.momentum = cfg["momentum"]
        self.gen = torch.Generator().manual_seed(cfg["seed"] + 1)
        if kind in ("warp-maml", "warp-leap"):
            self.model = warp_convnet(net, cfg["warp_after"])
            task_kwargs = {"momentum": self.momentum} if self.momentum else {}
            self.opt = warpopt.WarpGradMetaOptimizer(
                self.model, lr=cfg["lr"], meta_lr=cfg["meta_lr"], init_lr=cfg["init_lr"],
                objective=warpopt.exact if cfg["objective"] == "exact" else warpopt.approx,
                algorithm=warpopt.online(),
                # warp-leap: multi-shot tasks draw a random batch per step, so ΔL on a probe batch
                # (the change of one function) rather than on consecutive training batches
                initialisation=warpopt.maml() if kind == "warp-maml" else warpopt.leap(loss="probe"),
                **task_kwargs)
            self.names = [n for n, _ in self.model.named_adapt_parameters()]
        else:
            self.model = net
            self.baseline = MAMLBaseline(net, cfg["lr"], cfg["meta_lr"], cfg["inner_steps"],
                                         first_order=kind == "fomaml", momentum=self.momentum)
            self.names = self.baseline.adapt_names()
        self.model.train()

    def _support(self, ep):
        bs = self.cfg["inner_batch"]
        if bs is None:
            return lambda k: (ep.support_x, ep.support_y)

        def draw(k):
            idx = torch.randint(ep.support_x.shape[0], (bs,), generator=self.gen).to(self.device)
            return ep.support_x[idx], ep.support_y[idx]
        return draw

    def train_step(self, episodes) -> float:
        episodes = [ep.to(self.device) for ep in episodes]
        if not self.kind.startswith("warp"):
            return self.baseline.meta_step([(self._support(ep), (ep.query_x, ep.query_y)) for ep in episodes])
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
        if self.kind.startswith("warp"):
            return list(self.opt.theta0)
        return [p for _, p in self.model.named_parameters()]

    def evaluate(self, episodes, seed, progress=None) -> dict:
        return evaluate(self.model, self.names, self.theta0(), episodes, self.cfg["eval_steps"], self.cfg["lr"],
                        self.device, momentum=self.momentum, batch_size=self.cfg["inner_batch"], seed=seed,
                        progress=progress)

    def state(self):
        return warp_state(self.model, self.opt) if self.kind.startswith("warp") else self.baseline.state()

    def load(self, state):
        if self.kind.startswith("warp"):
            load_warp_state(self.model, self.opt, state)
        else:
            self.baseline.load(state)

    def counts(self) -> dict:
        if self.kind.startswith("warp"):
            return {"adapt": sum(p.numel() for p in self.model.adapt_parameters()),
                    "warp": sum(p.numel() for p in self.model.warp_parameters())}
        return {"adapt": sum(p.numel() for p in self.model.parameters()), "warp": 0}


def run_one(kind, ways, cfg, pools, device, progress=True) -> dict:
    cfg = {**cfg, **{k: per(cfg, k, ways) for k in ("meta_steps", "train_queries", "eval_episodes")}}
    torch.manual_seed(cfg["seed"])
    learner = Learner(kind, cfg, ways, in_channels(pools), device)
    train = EpisodeSampler(pools["train"], ways, cfg["train_shots"], cfg["train_queries"], seed=cfg["seed"])
    val = EpisodeSampler(pools["val"], ways, cfg["shots"], cfg["queries"], seed=10_000 + cfg["seed"],
                         num_episodes=cfg["val_episodes"])
    test = EpisodeSampler(pools["test"], ways, cfg["shots"], cfg["queries"], seed=20_000 + cfg["seed"],
                          num_episodes=cfg["eval_episodes"])
    curve, val_curve, best = [], [], (-1.0, None, 0)
    t0 = time.time()
    bar = tqdm(range(cfg["meta_steps"]), desc=f"{kind} {ways}-way {cfg['shots']}-shot", disable=not progress)
    mb = cfg["meta_batch"]
    for step in bar:
        loss = learner.train_step([train.episode(step * mb + i) for i in range(mb)])
        curve.append(loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(curve[-50:]):.3f}")
        if cfg["val_every"] and (step + 1) % cfg["val_every"] == 0:
            acc = learner.evaluate(val, seed=1)["accuracy"]
            val_curve.append((step + 1, acc))
            if acc > best[0]:
                best = (acc, learner.state(), step + 1)
    train_time = time.time() - t0
    if best[1] is not None:
        learner.load(best[1])
    t1 = time.time()
    res = learner.evaluate(test, seed=2, progress=(lambda it: tqdm(it, total=cfg["eval_episodes"], desc="test",
                                                                   leave=False)) if progress else None)
    return {"meta_learner": kind, "ways": ways, "shots": cfg["shots"], "accuracy": res["accuracy"],
            "ci95": res["ci95"], "test_episodes": res["episodes"], "train_seconds": round(train_time, 1),
            "eval_seconds": round(time.time() - t1, 1), "meta_steps": cfg["meta_steps"],
            "best_val_step": best[2] if best[1] is not None else None, "val_curve": val_curve,
            "train_loss_curve": [float(np.mean(curve[i:i + 50])) for i in range(0, len(curve), 50)],
            "parameters": learner.counts(), "per_episode": res["per_episode"]}


def plot(results, out: Path, cfg) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['meta_learner']}\n{r['ways']}-way {r['shots']}-shot" for r in results]
    a.bar(range(len(results)), [r["accuracy"] for r in results], yerr=[r["ci95"] for r in results], capsize=4,
          color=["C1" if r["meta_learner"].startswith("warp") else "C0" for r in results])
    a.set_xticks(range(len(results)), labels, fontsize=8)
    a.set_ylabel("test accuracy (%) ± 95% CI")
    a.set_title(f"{cfg['dataset']}: {cfg['eval_episodes']} test episodes")
    for r in results:
        xs = np.arange(len(r["train_loss_curve"])) * 50
        b.plot(xs, r["train_loss_curve"], label=f"{r['meta_learner']} {r['ways']}-way")
    b.set_xlabel("meta-step")
    b.set_ylabel("task loss (support, mean over 50 meta-steps)")
    b.legend(fontsize=8)
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
    (out / "results.json").write_text(json.dumps({"runs": [str(d) for d in dirs], "results": results}, indent=1))
    episodes = sorted({r["test_episodes"] for r in results})
    plot(results, out, {"dataset": "/".join(sorted(datasets)), "eval_episodes": "/".join(map(str, episodes))})
    for r in results:
        print(f"{r['meta_learner']:10s} {r['ways']}-way {r['shots']}-shot, {r['meta_steps']} meta-steps: "
              f"{r['accuracy']:.2f} ± {r['ci95']:.2f} % ({r['test_episodes']} episodes)")
    return results


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, Path(args.out))
    cfg = resolve(args)
    cfg["out"] = args.out
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    threads = args.threads if args.threads is not None else (1 if args.quick and device.type == "cpu" else None)
    cfg["threads"] = threads if threads is not None else torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    pools = load_pools(cfg)
    results = []
    for ways in cfg["ways"]:
        for kind in cfg["meta_learner"]:
            r = run_one(kind, ways, cfg, pools, device, progress=not args.no_progress)
            results.append(r)
            print(f"{kind:10s} {ways}-way {cfg['shots']}-shot: {r['accuracy']:.2f} ± {r['ci95']:.2f} % "
                  f"({r['test_episodes']} episodes; train {r['train_seconds']} s, eval {r['eval_seconds']} s)",
                  flush=True)
            summary = [{k: v for k, v in x.items() if k != "per_episode"} for x in results]
            (out / "results.json").write_text(json.dumps({"results": summary, "per_episode": {
                f"{x['meta_learner']}/{x['ways']}": x["per_episode"] for x in results}}, indent=1))
    plot(results, out, cfg)
    return results


if __name__ == "__main__":
    main()
