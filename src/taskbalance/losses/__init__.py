"""Loss functions for multi-task learning, each with a matching ``nn.Module``.

Every function takes ``(input, target)`` in that order, like :mod:`torch.nn.functional`, with
any extra tensors (log-variances, sample weights) and options by keyword. All accept
``reduction="mean" | "sum" | "none"``, are differentiable, keep the dtype and device of
``input`` (targets are cast to ``input``'s dtype), and never broadcast ``input`` against
``target``: mismatched shapes raise a ``ValueError`` that names both shapes. Flags must be
``True``/``False`` and integer options ints (NumPy's too): a flag given as the string
``"False"`` raises a ``TypeError`` naming it instead of counting as true. The modules check
their options when constructed.

=====================  ===========================  ==========================================
function               module                       reference
=====================  ===========================  ==========================================
squared_error          SquaredErrorLoss             least squares
absolute_error         AbsoluteErrorLoss            least absolute deviations
huber_loss             HuberLoss                    Huber, 1964
tukey_loss             TukeyLoss                    Belagiannis et al., ICCV 2015
binary_cross_entropy   BinaryCrossEntropyLoss       probabilities or logits
cross_entropy          CrossEntropyLoss             label smoothing: Szegedy et al., 2016
focal_loss             FocalLoss                    Lin et al., ICCV 2017
dice_loss              DiceLoss                     Milletari et al., 2016; Sudre et al., 2017
perceptual_loss        PerceptualLoss               Johnson et al., ECCV 2016
gaussian_nll_loss      GaussianNLLLoss              Kendall & Gal, NeurIPS 2017
bbox_kl_loss           BBoxKLLoss                   He et al., CVPR 2019
kl_divergence          KLDivergenceLoss             KL(target‖input)
wasserstein_1d         Wasserstein1DLoss            1-D earth mover's distance
frechet_distance       FrechetDistanceLoss          FID formula, Heusel et al., 2017
=====================  ===========================  ==========================================

Example:
    >>> import torch
    >>> from taskbalance import losses
    >>> prediction = torch.tensor([0.5, 3.0], requires_grad=True)
    >>> loss = losses.huber_loss(prediction, torch.zeros(2), delta=1.0)
    >>> loss.backward()
    >>> prediction.grad
    tensor([0.2500, 0.5000])
"""

from taskbalance.losses._classification import (
    binary_cross_entropy,
    cross_entropy,
    dice_loss,
    focal_loss,
)
from taskbalance.losses._common import Reduction
from taskbalance.losses._distances import (
    frechet_distance,
    kl_divergence,
    perceptual_loss,
    wasserstein_1d,
)
from taskbalance.losses._modules import (
    AbsoluteErrorLoss,
    BBoxKLLoss,
    BinaryCrossEntropyLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    FrechetDistanceLoss,
    GaussianNLLLoss,
    HuberLoss,
    KLDivergenceLoss,
    PerceptualLoss,
    SquaredErrorLoss,
    TukeyLoss,
    Wasserstein1DLoss,
)
from taskbalance.losses._regression import (
    absolute_error,
    bbox_kl_loss,
    gaussian_nll_loss,
    huber_loss,
    squared_error,
    tukey_loss,
)

__all__ = [
    "AbsoluteErrorLoss",
    "BBoxKLLoss",
    "BinaryCrossEntropyLoss",
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "FrechetDistanceLoss",
    "GaussianNLLLoss",
    "HuberLoss",
    "KLDivergenceLoss",
    "PerceptualLoss",
    "Reduction",
    "SquaredErrorLoss",
    "TukeyLoss",
    "Wasserstein1DLoss",
    "absolute_error",
    "bbox_kl_loss",
    "binary_cross_entropy",
    "cross_entropy",
    "dice_loss",
    "focal_loss",
    "frechet_distance",
    "gaussian_nll_loss",
    "huber_loss",
    "kl_divergence",
    "perceptual_loss",
    "squared_error",
    "tukey_loss",
    "wasserstein_1d",
]
