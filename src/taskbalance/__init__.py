"""taskbalance: decide how much each task's loss counts when one network learns several tasks.

Three lines in any training loop::

    import taskbalance as tb
    balancer = tb.create("dwa", num_tasks=3)
    balancer(torch.stack([loss_a, loss_b, loss_c])).backward()

Every method returns one objective for one ordinary ``backward()``; ``tb.available()`` lists
them all.
"""

from taskbalance._base import Balancer
from taskbalance._registry import available, create, hyperparameters, method_class, register
from taskbalance.methods import DTP, DWA, EW, FAMO, GLS, IMTLL, RLW, SI, UW, Fixed

__version__ = "0.1.0"

__all__ = [
    "DTP",
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLL",
    "RLW",
    "SI",
    "UW",
    "Balancer",
    "Fixed",
    "__version__",
    "available",
    "create",
    "hyperparameters",
    "method_class",
    "register",
]
