"""Every balancing method, one private module each; importing this package registers them."""

from taskbalance.methods._cagrad import CAGrad
from taskbalance.methods._dtp import DTP
from taskbalance.methods._dwa import DWA
from taskbalance.methods._ew import EW
from taskbalance.methods._fairgrad import FairGrad
from taskbalance.methods._famo import FAMO
from taskbalance.methods._fixed import Fixed
from taskbalance.methods._gls import GLS
from taskbalance.methods._gradient_base import GradientBalancer
from taskbalance.methods._imtl_l import IMTLL
from taskbalance.methods._mgda import MGDA
from taskbalance.methods._nash_mtl import NashMTL
from taskbalance.methods._rlw import RLW
from taskbalance.methods._si import SI
from taskbalance.methods._upgrad import DualProj, UPGrad
from taskbalance.methods._uw import UW

__all__ = [
    "DTP",
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLL",
    "MGDA",
    "RLW",
    "SI",
    "UW",
    "CAGrad",
    "DualProj",
    "FairGrad",
    "Fixed",
    "GradientBalancer",
    "NashMTL",
    "UPGrad",
]
