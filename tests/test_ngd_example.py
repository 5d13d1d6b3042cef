"""examples/ngd.py (Appendix G: Table 4, Fig. 7): statistics, settings and a tiny end-to-end run."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import ngd  # noqa: E402

DATA = ngd.harness.data_root("omniglot")
needs_data = pytest.mark.skipif(not (DATA / "alphabets.tsv").is_file(), reason=f"Omniglot not found at {DATA}")


def test_geometry_is_the_mean_and_the_nuclear_norm_of_cov_minus_identity():
    g = torch.Generator().manual_seed(0)
    # channels with variances 4 and 0.25 and means 1 and 3, spread over images and positions
    z = torch.randn(4000, 2, 2, 2, generator=g, dtype=torch.float64)
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True)
    h = z * torch.tensor([2.0, 0.5], dtype=torch.float64)[None, :, None, None] \
        + torch.tensor([1.0, 3.0], dtype=torch.float64)[None, :, None, None]
    x = h.transpose(0, 1).reshape(2, -1)
    cov = torch.cov(x)
    mean, s1 = ngd.geometry(h)
    assert mean == pytest.approx(2.0, abs=1e-9)
    assert s1 == pytest.approx(torch.linalg.eigvalsh(cov - torch.eye(2, dtype=cov.dtype)).abs().sum().item())
    assert s1 == pytest.approx(3.0 + 0.75, abs=0.05)   # |4 − 1| + |0.25 − 1| (nearly uncorrelated)
    white = torch.randn(20000, 3, 1, 1, generator=g, dtype=torch.float64)
    assert ngd.geometry(white)[1] < 0.1                   # whitened: Cov ≈ I


def test_quick_and_protocol_settings():
    full = ngd.parse_args([])
    assert (full.batch_size, full.lr, full.num_pretrain, full.meta_steps, full.meta_batch) == (200, 1.0, 25, 1000, 20)
    assert full.objective == "exact" and full.algorithm == "offline" and full.replay_batch == 1
    assert ngd.og.WARP_LAYERS[ngd.ROWS["warp-linear"][2]] is ngd.warpopt.ConvWarp
    assert ngd.og.WARP_LAYERS[ngd.ROWS["warp-nonlinear"][2]] is ngd.warpopt.TwoLayerResidualWarp
    quick = ngd.parse_args(["--quick", "--meta-steps", "2"])
    assert quick.meta_steps == 2 and quick.filters == ngd.QUICK["filters"] and quick.batch_size == 200


@needs_data
def test_tiny_run_writes_table4_and_fig7(tmp_path):
    text = ngd.main(["--num-pretrain", "2", "--meta-batch", "2", "--meta-steps", "1", "--steps", "3",
                     "--eval-steps", "3", "--max-updates", "3", "--num-eval-tasks", "1", "--fig7-every", "1",
                     "--filters", "8", "--batch-size", "20", "--threads", "1", "--out", str(tmp_path)])
    runs = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(runs) == set(ngd.ROWS)
    for method, r in runs.items():
        assert 0 <= r["test_acc"] <= 1 and len(r["train_curve"]) == 3
        if ngd.ROWS[method][2]:   # warped rows: Fig. 7 statistics for 4 layers, warps meta-trained
            assert r["task_steps"] == 6 and r["replayed"] == 3
            assert all(len(r["fig7"][k]) == 4 for k in ("pre_mean", "post_mean", "pre_s1", "post_s1"))
        else:
            assert r["fig7"] == {} and r["task_steps"] == 0
    assert "KFAC (NGD)" in text and "81.3 ± 4.0" in text and (tmp_path / "table.md").read_text() == text
    assert (tmp_path / "fig7.png").stat().st_size > 0 and (tmp_path / "curves.png").stat().st_size > 0
    assert ngd.main(["--report", "--out", str(tmp_path)]) == text
    assert "WarpGrad" not in ngd.main(["--report", "--quick", "--out", str(tmp_path)])   # no quick-mode runs


@needs_data
def test_only_warps_are_meta_learned_from_the_rows_shared_random_init():
    args = ngd.parse_args(["--num-pretrain", "2", "--meta-batch", "2", "--meta-steps", "1", "--steps", "3",
                           "--max-updates", "3", "--filters", "8", "--batch-size", "20"])
    args.run_seed, args.warp_layer = 0, "conv"
    data = ngd.og._load(args.data, args.cache_dir, args.device)
    train, _ = ngd.og.multishot_split(data, seed=0, num_pretrain=2)
    timer = {"task_steps": 0, "task_s": 0.0, "replayed": 0, "meta_s": 0.0}
    model, checkpoints = ngd.og.meta_train("warp-leap", args, train, torch.Generator().manual_seed(0), timer,
                                           initialisation=ngd.warpopt.none)
    theta0 = checkpoints["equal_steps"].state["theta0"]
    _, fresh = ngd.og.build_model(args, "conv", 0)       # what the SGD and KFAC rows start from
    for t, p in zip(theta0, fresh.adapt_parameters()):
        assert torch.equal(t, p)                             # λC(θ0) = 0: θ0 is the random init
    assert any(not torch.equal(a, b) for a, b in zip(model.warp_parameters(), fresh.warp_parameters()))
