"""warpopt: WarpGrad (Flennerhag et al., ICLR 2020) for PyTorch."""

__version__ = "0.1.0"
