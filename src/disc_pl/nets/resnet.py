"""ResNet-18 classifier backbone with feature taps (torchvision topology, He et al. 2016).

The network takes [0, 1] pixels; normalisation (mean/std) is a pair of buffers inside it, so
generators, metrics and files never see normalised tensors. No in-place activations: the
counterfactual engine back-propagates through the classifier to the input, and DUQ's
gradient penalty needs a second backward pass (create_graph=True).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


def _stats_buffer(values: Sequence[float] | None, channels: int, fill: float) -> torch.Tensor:
    if values is None:
        return torch.full((1, channels, 1, 1), fill)
    t = torch.as_tensor(list(values), dtype=torch.float32)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"expected {channels} normalisation values, got {t.numel()}")
    return t.reshape(1, channels, 1, 1).clone()


class ResNet18(nn.Module):
    """ResNet-18: BasicBlock x [2, 2, 2, 2] with widths (w, 2w, 4w, 8w).

    small_input=True replaces the 7x7/2 stem + max-pool by a 3x3/1 stem (for 32-96 px images,
    as in the CIFAR variants); small_input=False is exactly torchvision's stem.
    mean/std (per channel, or None for no normalisation) are applied inside forward.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        small_input: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", _stats_buffer(mean, in_channels, 0.0))
        self.register_buffer("std", _stats_buffer(std, in_channels, 1.0))
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.widths = (width, 2 * width, 4 * width, 8 * width)
        self.layer1 = self._stage(width, width, stride=1)
        self.layer2 = self._stage(width, 2 * width, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, stride=2)
        self.layer4 = self._stage(4 * width, 8 * width, stride=2)
        # A DUQ trunk swaps fc for nn.Identity, so forward() then returns pooled features.
        self.fc: nn.Module = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[0,1] pixels [B,C,H,W] -> outputs of layer1..layer4 ([B,w,H',W'] ... [B,8w,H'/8,W'/8])."""
        h = (x - self.mean) / self.std
        h = self.maxpool(F.relu(self.bn1(self.conv1(h))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = layer(h)
            feats.append(h)
        return feats

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.stages(x)
        logits = self.fc(feats[-1].mean(dim=(2, 3)))
        return logits, feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]
