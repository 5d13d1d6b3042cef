"""warpopt: WarpGrad (Flennerhag et al., ICLR 2020, "Meta-Learning with Warped Gradient Descent").

model = warpopt.warp(net)
opt = warpopt.WarpGradMetaOptimizer(model, lr=0.1, meta_lr=1e-3)
"""

from . import (
    algorithms,
    initialisation,
    kernels,
    kfac,
    layers,
    objectives,
    selection,
    task_optimizers,
    vectorised,
    warping,
)
from .algorithms import continual, offline, online
from .initialisation import InitialisationLearner, fomaml, leap, maml, multitask, none, reptile
from .kfac import KFAC
from .layers import (
    ConvBNWarp,
    ConvWarp,
    LinearWarp,
    LSTMWarp,
    MLPResidualWarp,
    ResidualWarp,
    ScaleWarp,
    TaskAdaptable,
    TaskFiLM,
    TwoLayerResidualWarp,
    default_warp_layer,
)
from .meta_optimizer import WarpGradMetaOptimizer
from .objectives import ReplayContext, approx, exact
from .task_optimizers import functional_step_for, register_functional_step
from .tasks import Task, supervised
from .trajectory import CPUStorage, DeviceStorage, DiskStorage, ReplayBuffer, Sample, Trajectory
from .warping import is_warped, unwarp, warp

__version__ = "0.1.0"

__all__ = [
    "warp",
    "unwarp",
    "is_warped",
    "WarpGradMetaOptimizer",
    "Task",
    "supervised",
    "exact",
    "approx",
    "ReplayContext",
    "online",
    "offline",
    "continual",
    "leap",
    "maml",
    "fomaml",
    "reptile",
    "multitask",
    "none",
    "InitialisationLearner",
    "ReplayBuffer",
    "Trajectory",
    "Sample",
    "DeviceStorage",
    "CPUStorage",
    "DiskStorage",
    "ConvWarp",
    "LinearWarp",
    "ScaleWarp",
    "ConvBNWarp",
    "ResidualWarp",
    "TwoLayerResidualWarp",
    "MLPResidualWarp",
    "LSTMWarp",
    "TaskFiLM",
    "TaskAdaptable",
    "default_warp_layer",
    "functional_step_for",
    "register_functional_step",
    "KFAC",
    "algorithms",
    "initialisation",
    "kernels",
    "kfac",
    "layers",
    "selection",
    "objectives",
    "task_optimizers",
    "vectorised",
    "warping",
]
