"""examples/reproduce.py: every reproduction in one command, one report (tiny settings here)."""
import json

import pytest

import harness
import reproduce

CACHE = str(harness.ROOT / "runs" / "cache")
TINY = {
    "quickstart": ["--meta-steps", "3", "--eval-tasks", "3"],
    "synthetic_2d": ["--meta-steps", "2", "--steps", "10", "--eval-tasks", "2", "--eval-starts", "3"],
    "continual_sine": ["--quick", "--meta-steps", "2", "--meta-batch", "1", "--hidden", "16", "--warp-hidden", "8",
                       "--max-updates", "3", "--eval-sequences", "3", "--eval-val", "4", "--sgd-lrs", "0.01"],
    "omniglot": ["--num-pretrain", "2", "--meta-batch", "2", "--meta-steps", "1", "--steps", "3", "--eval-steps", "3",
                 "--max-updates", "12", "--num-eval-tasks", "1", "--meta-learner", "warp-leap", "leap", "sgd",
                 "--equal-time", "--cache-dir", CACHE],
    "fewshot": ["--dataset", "omniglot", "--ways", "5", "--filters", "4", "4", "4", "4", "--meta-steps", "2",
                "--eval-episodes", "2", "--meta-learner", "warp-maml", "maml", "--equal-time", "--cache-dir", CACHE],
    "maze": ["--model", "warp-rnn", "rnn", "--episodes", "3", "--seeds", "0", "1", "--size", "7", "--episode-length",
             "6", "--batch", "3", "--hidden", "8", "--meta-hidden", "6", "--warp-every", "2"],
    "ngd": ["--num-pretrain", "2", "--meta-batch", "2", "--meta-steps", "1", "--steps", "3", "--eval-steps", "3",
            "--max-updates", "3", "--num-eval-tasks", "1", "--fig7-every", "1", "--filters", "8", "--batch-size", "20",
            "--method", "sgd", "warp-linear", "--cache-dir", CACHE],
}
needs_omniglot = pytest.mark.skipif(not harness.data_present("omniglot", harness.data_root("omniglot")),
                                    reason="Omniglot not found (set WARPOPT_DATA)")


@pytest.fixture()
def tiny(monkeypatch):
    for rep in reproduce.REPRODUCTIONS:
        monkeypatch.setattr(rep, "quick", [TINY.get(rep.name, ["--quick"])])
    return reproduce


@needs_omniglot
def test_quick_report_sets_every_result_beside_the_paper(tiny, tmp_path):
    names = list(TINY)
    report = tiny.main(["--quick", "--only", *names, "--out", str(tmp_path)])
    assert [e["name"] for e in report["entries"]] == names
    assert all(e["status"] == "ok" for e in report["entries"]), [e.get("message") for e in report["entries"]]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["entries"][0]["rows"] == report["entries"][0]["rows"]
    text = (tmp_path / "report.md").read_text()
    for rep in tiny.REPRODUCTIONS:
        if rep.name in names:
            assert rep.title in text and (tmp_path / rep.name / "log.txt").is_file()
    entries = {e["name"]: e for e in report["entries"]}
    omniglot = entries["omniglot"]["rows"]
    assert any(r["paper"].startswith("83.8") and r["comparison"].startswith("equal meta-steps") for r in omniglot)
    assert any(r["result"].startswith("leap given Warp-Leap's training time")
               and r["comparison"].startswith("equal training time") for r in omniglot)
    assert any(r["comparison"].startswith("equal training time") for r in entries["fewshot"]["rows"])
    assert any("98.7" in r["paper"] for r in entries["fewshot"]["rows"])
    assert any(r["comparison"].startswith("equal iterations") for r in entries["maze"]["rows"])
    assert [r["paper"] for r in entries["ngd"]["rows"]] == ["40.1 ± 6.1 %", "68.0 ± 4.4 %"]
    for e in report["entries"]:
        assert e["figures"], e["name"]
        for f in e["figures"]:
            assert (tmp_path / f["ours"]).stat().st_size > 0 and f"![{f['ours']}]({f['ours']})" in text
    # The report can be rebuilt from the outputs alone.
    (tmp_path / "report.md").unlink()
    again = tiny.main(["--quick", "--only", *names, "--out", str(tmp_path), "--report-only"])
    assert [e["rows"] for e in again["entries"]] == [e["rows"] for e in report["entries"]]
    assert (tmp_path / "report.md").read_text() == text


def test_a_failing_or_data_less_reproduction_does_not_stop_the_others(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny.REPRODUCTIONS[0], "quick", [["--no-such-option"]])  # quickstart
    report = tiny.main(["--quick", "--only", "quickstart", "omniglot", "synthetic_2d", "--out", str(tmp_path),
                        "--data-root", str(tmp_path / "no-data")])
    status = {e["name"]: e["status"] for e in report["entries"]}
    assert status["quickstart"].startswith("failed: SystemExit")
    assert status["omniglot"] == "skipped: dataset missing" and status["synthetic_2d"] == "ok"
    text = (tmp_path / "report.md").read_text()
    assert "images_background.zip" in text and str((tmp_path / "no-data" / "omniglot").resolve()) in text


def test_full_protocols_need_a_gpu_or_quick(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--only", "quickstart"])
    assert "--quick" in capsys.readouterr().err


def test_full_protocol_commands():
    reps = {r.name: r for r in reproduce.REPRODUCTIONS}
    assert len(reps["omniglot"].full) == 7 and all("--seeds" in argv for argv in reps["omniglot"].full)
    folder = reproduce._run_folder(harness.Path("out"), "fewshot", reps["fewshot"].full, 2)
    assert folder == harness.Path("out/fewshot/run2")
    args = reproduce.parser().parse_args(["--device", "cuda", "--data-root", "/d"])
    argv = reproduce._argv(reps["fewshot"], reps["fewshot"].full[2], folder, args)
    assert argv[argv.index("--data-root") + 1] == "/d/tieredimagenet" and "cuda" in argv


@pytest.mark.slow
def test_the_real_quick_modes_show_the_effects(tmp_path):
    """The quickstart's and the 2-D example's actual quick modes (about a minute on 2 cores)."""
    report = reproduce.main(["--quick", "--only", "quickstart", "synthetic_2d", "--out", str(tmp_path)])
    assert [e["status"] for e in report["entries"]] == ["ok", "ok"]
    quick = json.loads((tmp_path / "quickstart" / "results.json").read_text())["held_out_mse"]
    assert quick["warpgrad"] < quick["sgd_identity_warp"] / 10
    s2d = json.loads((tmp_path / "synthetic_2d" / "results.json").read_text())
    assert s2d["warpgrad"]["mean_final_loss"] < s2d["gradient_descent"]["mean_final_loss"]
    assert s2d["held_out_starts"] == 1000
