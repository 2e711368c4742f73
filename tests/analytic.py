"""Hand-built classifiers whose decisions are known in closed form (no training, no luck).

``PatchReader``: the logit of class 1 is a weighted sum of pixels, weight 1 on an 8x8 patch and
0.15 elsewhere. The patch holds 6 % of the pixels but 31 % of the input-gradient mass, the
situation of a real classifier whose evidence is local while its gradient is not.
``SpreadReader``: the same with evidence spread evenly (no small region can flip it).
Both expose ``forward_features(x) -> (logits, [x])`` like the engine's classifiers; their
buffers take the default dtype, so a test may run them in float64.
"""
from __future__ import annotations

import torch
from torch import nn


class PatchReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        w = torch.full((1, 3, 32, 32), 0.15)
        w[..., 20:28, 8:16] = 1.0
        self.register_buffer("w", w / w.sum())
        self.patch = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
        self.patch[..., 20:28, 8:16] = True

    def forward_features(self, x):
        s = ((x - 0.5) * self.w).flatten(1).sum(1) * 400.0 - 2.0
        return torch.stack([torch.zeros_like(s), s], 1), [x]

    def forward(self, x):
        return self.forward_features(x)[0]


class SpreadReader(PatchReader):
    def __init__(self) -> None:
        super().__init__()
        self.w.fill_(1.0 / self.w.numel())


def patch_queries(n: int = 4, seed: int = 0, dtype: torch.dtype | None = None):
    """``n`` noisy grey 32x32 images (class 0 for both readers) and targets 1."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    return x.to(dtype or torch.get_default_dtype()), torch.ones(n, dtype=torch.long)
