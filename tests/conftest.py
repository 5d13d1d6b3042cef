"""Test-session settings."""
import torch

# The models under test are tiny: on a 2-core CI machine torch's intra-op threads cost far more
# than they save (measured 10x slower with 2 threads when the machine is shared).
torch.set_num_threads(1)
