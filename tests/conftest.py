"""Test-session settings."""
import gc
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Datasets: the examples look in $WARPOPT_DATA/<name> (else ./data/<name>); tests and CI use the
# shared copy beside the checkout unless the variable already points elsewhere.
os.environ.setdefault("WARPOPT_DATA", str(ROOT.parent / "shared" / "data"))
# The examples import their shared harness as a top-level module, as they do when run as scripts.
sys.path.insert(0, str(ROOT / "examples"))

# The models under test are tiny: on a 2-core CI machine torch's intra-op threads cost far more
# than they save (measured 10x slower with 2 threads when the machine is shared).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _no_replay_directory_left(tmp_path_factory):
    """Every test's temporary files go under pytest's base temp dir (also for subprocesses, via
    TMPDIR), so a ``DiskStorage`` directory left behind by any test is found at the end."""
    base = tmp_path_factory.getbasetemp()
    session_tmp = tempfile.mkdtemp(prefix="tmp-", dir=base)
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = session_tmp
    yield
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved[1]
    gc.collect()  # storages kept alive only by reference cycles are finalised now
    left = sorted(str(p) for p in base.rglob("warpopt-replay-*"))
    assert not left, f"replay storage directories left behind by the tests: {left}"
