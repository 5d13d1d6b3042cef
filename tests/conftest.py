"""Test-session settings."""
import os
import sys
from pathlib import Path

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
