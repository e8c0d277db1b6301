"""Every balancing method, one private module each; importing this package registers them."""

from taskbalance.methods._aligned_mtl import AlignedMTL
from taskbalance.methods._cagrad import CAGrad
from taskbalance.methods._config import ConFIG
from taskbalance.methods._db_mtl import DBMTL
from taskbalance.methods._dtp import DTP
from taskbalance.methods._dwa import DWA
from taskbalance.methods._ew import EW
from taskbalance.methods._excess_mtl import ExcessMTL
from taskbalance.methods._fairgrad import FairGrad
from taskbalance.methods._famo import FAMO
from taskbalance.methods._fixed import Fixed
from taskbalance.methods._gls import GLS
from taskbalance.methods._graddrop import GradDrop
from taskbalance.methods._gradient_base import GradientBalancer
from taskbalance.methods._gradnorm import GradNorm
from taskbalance.methods._gradvac import GradVac
from taskbalance.methods._imtl_g import IMTLG
from taskbalance.methods._imtl_l import IMTLL
from taskbalance.methods._mgda import MGDA
from taskbalance.methods._moco import MoCo
from taskbalance.methods._nash_mtl import NashMTL
from taskbalance.methods._pcgrad import PCGrad
from taskbalance.methods._rlw import RLW
from taskbalance.methods._si import SI
from taskbalance.methods._stch import STCH
from taskbalance.methods._upgrad import DualProj, UPGrad
from taskbalance.methods._uw import UW

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
    "MoCo",
    "NashMTL",
    "PCGrad",
    "UPGrad",
]
