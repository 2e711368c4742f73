"""A small position-aware CNN: the default network of the classifier-discrepancy recipe.

Three conv(3x3)-BN-ReLU-maxpool(2) blocks with widths (w, 2w, 4w), then one linear layer on the
*flattened* map (no global pooling): the attribute of aligned images (a mouth, a lesion centre)
sits at a roughly fixed place, and keeping where a feature is makes the network learn from a
few dozen images per class, where a globally pooled ResNet-18 stays at chance
(docs/FINDINGS.md, "SmallCNN").
Takes [0, 1] pixels; normalisation is inside, as for every network of the project.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 16,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"SmallCNN needs an image size divisible by 8, got {image_size}")
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * in_channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * in_channels).view(1, -1, 1, 1))
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in (width, 2 * width, 4 * width):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.fc = nn.Linear(4 * width * (image_size // 8) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> logits [B, num_classes]."""
        h = self.features((x - self.mean) / self.std)
        return self.fc(h.flatten(1))
