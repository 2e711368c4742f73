"""Loss-prediction module for DEP (paper section 4; Yoo & Kweon 2019, "Learning Loss for
Active Learning"): it predicts the classifier's per-sample loss from its intermediate features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LossPredictor(nn.Module):
    """GAP of each tapped feature map -> Linear(C_i, hidden) + ReLU -> concat -> Linear(., 1).

    Feature maps may be [B, C, H, W] (globally average-pooled) or already flat [B, C].
    Returns the predicted loss s_hat, shape [B].
    """

    def __init__(self, in_channels: Sequence[int] = (64, 128, 256, 512), hidden: int = 128) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        self.branches = nn.ModuleList(nn.Linear(c, hidden) for c in self.in_channels)
        self.head = nn.Linear(hidden * len(self.in_channels), 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} feature maps, got {len(feats)}")
        pooled = [f.mean(dim=(2, 3)) if f.dim() == 4 else f.flatten(1) for f in feats]
        hidden = [F.relu(branch(p)) for branch, p in zip(self.branches, pooled)]
        return self.head(torch.cat(hidden, dim=1)).squeeze(1)
