"""taskbalance: decide how much each task's loss counts when one network learns several tasks.

Three lines in any training loop::

    import taskbalance as tb
    balancer = tb.create("dwa", num_tasks=3)
    balancer(torch.stack([loss_a, loss_b, loss_c]), features=z).backward()

Every method returns one objective for one ordinary ``backward()``; ``tb.available()`` lists
them all. Losses live in :mod:`taskbalance.losses`, probability tools in
:mod:`taskbalance.distributions` and :mod:`taskbalance.info`, per-task learning rates in
:mod:`taskbalance.optim`.
"""

from taskbalance import distributions, info, losses, optim
from taskbalance._base import Balancer
from taskbalance._diagnostics import GradientDiagnostics, gradient_diagnostics
from taskbalance._gramian import gramian
from taskbalance._registry import available, create, hyperparameters, method_class, register
from taskbalance._solvers import SolverError
from taskbalance.distributions import Gumbel, gumbel_max_sample, gumbel_softmax
from taskbalance.methods import (
    DBMTL,
    DTP,
    DWA,
    EW,
    FAMO,
    GLS,
    IMTLG,
    IMTLL,
    MGDA,
    RLW,
    SI,
    STCH,
    UW,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    ExcessMTL,
    FairGrad,
    Fixed,
    GradDrop,
    GradientBalancer,
    GradNorm,
    GradVac,
    MoCo,
    NashMTL,
    PCGrad,
    UPGrad,
)
from taskbalance.optim import stop_gradient, task_param_groups

__version__ = "0.2.0.dev0"

__all__ = [
    "DBMTL",
    "DTP",
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "SI",
    "STCH",
    "UW",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "Fixed",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GradientBalancer",
    "GradientDiagnostics",
    "Gumbel",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "SolverError",
    "UPGrad",
    "__version__",
    "available",
    "create",
    "distributions",
    "gradient_diagnostics",
    "gramian",
    "gumbel_max_sample",
    "gumbel_softmax",
    "hyperparameters",
    "info",
    "losses",
    "method_class",
    "optim",
    "register",
    "stop_gradient",
    "task_param_groups",
]
