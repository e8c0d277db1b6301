"""Default models of the bundled benchmarks: hard parameter sharing.

Every model is a shared trunk followed by one small head per task. ``forward`` returns the trunk
output (the *features* that gradient methods differentiate in features mode) together with the
list of head outputs, so one training loop drives any balancer.

A model whose heads do not all read one shared tensor (MTAN: each task's attention reads the
shared network at every level) returns ``None`` as its features and names the submodule that
holds exactly its shared parameters in the class attribute ``shared_submodule``
(:func:`shared_submodule_name`); the harness then runs gradient methods in parameters mode over
that submodule and measures its gradient diagnostics there.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MultiTaskModel(nn.Module):
    """A shared trunk and one head per task.

    Args:
        trunk: maps an input batch to a ``[N, D]`` feature tensor.
        heads: one module per task, each mapping ``[N, D]`` features to that task's output.

    Example:
        >>> import torch
        >>> model = MultiTaskModel(mlp_trunk(4, [8]), linear_heads(8, [3, 1]))
        >>> features, outputs = model(torch.zeros(2, 4))
        >>> tuple(features.shape), [tuple(o.shape) for o in outputs]
        ((2, 8), [(2, 3), (2, 1)])
    """

    def __init__(self, trunk: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Shared features and the per-task outputs.

        Args:
            inputs: a batch of inputs.

        Returns:
            ``(features, outputs)``: the trunk output and one output tensor per head.
        """
        features = self.trunk(inputs)
        return features, [head(features) for head in self.heads]


def mlp_trunk(
    input_size: int, hidden_sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    """A fully connected trunk: ``Linear → activation`` for each hidden size.

    Args:
        input_size: number of input features (inputs are flattened first).
        hidden_sizes: width of each hidden layer; the last one is the feature size.
        activation: the activation module class.

    Returns:
        The trunk as an ``nn.Sequential``.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    previous = input_size
    for width in hidden_sizes:
        layers += [nn.Linear(previous, width), activation()]
        previous = width
    return nn.Sequential(*layers)


def small_cnn_trunk(side: int, channels: Sequence[int], feature_size: int) -> nn.Sequential:
    """A small convolutional trunk for one-channel ``side × side`` images.

    Each entry of ``channels`` adds a 3×3 convolution (padding 1) and a ReLU; every layer after
    the first uses stride 2. A linear layer with a ReLU maps the flattened maps to the features.

    Args:
        side: image height and width in pixels.
        channels: output channels of each convolution.
        feature_size: size of the feature vector the heads read.

    Returns:
        The trunk as an ``nn.Sequential``; it accepts ``[N, side, side]`` or ``[N, 1, side,
        side]`` inputs.
    """
    layers: list[nn.Module] = [_AddChannel()]
    previous, size = 1, side
    for index, width in enumerate(channels):
        stride = 1 if index == 0 else 2
        layers += [nn.Conv2d(previous, width, 3, stride=stride, padding=1), nn.ReLU()]
        size = (size + 2 - 3) // stride + 1
        previous = width
    layers += [nn.Flatten(), nn.Linear(previous * size * size, feature_size), nn.ReLU()]
    return nn.Sequential(*layers)


class _AddChannel(nn.Module):
    """Give ``[N, H, W]`` images a channel dimension; leave ``[N, C, H, W]`` as it is."""

    def forward(self, images: Tensor) -> Tensor:
        return images.unsqueeze(1) if images.dim() == 3 else images


def linear_heads(feature_size: int, output_sizes: Sequence[int]) -> list[nn.Module]:
    """One linear head per task.

    Args:
        feature_size: size of the shared features.
        output_sizes: output size of each task's head.

    Returns:
        The heads, in task order.
    """
    return [nn.Linear(feature_size, size) for size in output_sizes]


def mlp_heads(feature_size: int, hidden_size: int, output_sizes: Sequence[int]) -> list[nn.Module]:
    """One ``Linear → ReLU → Linear`` head per task.

    Args:
        feature_size: size of the shared features.
        hidden_size: width of each head's hidden layer.
        output_sizes: output size of each task's head.

    Returns:
        The heads, in task order.
    """
    return [
        nn.Sequential(nn.Linear(feature_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, size))
        for size in output_sizes
    ]


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shared_submodule_name(model: nn.Module) -> str | None:
    """The ``shared_submodule`` a model declares (unwrapping DDP), or None.

    Args:
        model: a benchmark model, possibly wrapped in ``DistributedDataParallel``.

    Returns:
        The name of the submodule holding exactly the shared parameters of a model without a
        single shared feature tensor (``"trunk"`` for MTAN), or None for a model whose
        ``forward`` returns its shared features.

    Example:
        >>> shared_submodule_name(MultiTaskModel(mlp_trunk(4, [8]), linear_heads(8, [1]))) is None
        True
    """
    name = getattr(unwrapped(model), "shared_submodule", None)
    return name if isinstance(name, str) else None
