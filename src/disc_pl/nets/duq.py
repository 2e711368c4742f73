"""DUQ: deterministic uncertainty quantification (van Amersfoort et al., ICML 2020).

Each class c has a weight matrix W_c [emb, in] and a centroid e_c [emb]; the kernel
K_c(x) = exp(-mean_k((W_c f(x) - e_c)_k^2) / (2 sigma^2)) is in [0, 1]. Centroids are
an exponential moving average of class-wise embeddings, kept as running sums:
N_c <- gamma N_c + (1 - gamma) n_c,  m_c <- gamma m_c + (1 - gamma) sum_{i: y_i = c} W_c f_i,
e_c = m_c / N_c.
"""

from __future__ import annotations


import torch
from torch import nn

from disc_pl.nets.resnet import ResNet18

# Initial pseudo-count of each class in the running sums (van Amersfoort et al.'s choice):
# the random initial centroid weighs as much as this many samples.
_INITIAL_COUNT = 13.0


class DUQHead(nn.Module):
    """RBF head: features [B, in] -> kernel values [B, K]."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        embedding_size: int = 256,
        length_scale: float = 0.5,
        gamma: float = 0.999,
    ) -> None:
        super().__init__()
        self.length_scale = float(length_scale)
        self.gamma = float(gamma)
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes, in_features))
        nn.init.kaiming_normal_(self.W, nonlinearity="relu")
        self.register_buffer("N", torch.full((num_classes,), _INITIAL_COUNT))
        self.register_buffer("m", torch.randn(embedding_size, num_classes) * 0.05 * _INITIAL_COUNT)

    @property
    def centroids(self) -> torch.Tensor:
        """[emb, K]."""
        return self.m / self.N.unsqueeze(0)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """[B, in] -> per-class embeddings W_c f, [B, emb, K]."""
        return torch.einsum("bi,eki->bek", features, self.W)

    def log_kernel(self, z: torch.Tensor) -> torch.Tensor:
        """log K: [B, emb, K] -> [B, K]. Exact where K itself underflows to 0."""
        sq = (z - self.centroids.unsqueeze(0)).pow(2).mean(dim=1)
        return -sq / (2 * self.length_scale**2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, in] -> K [B, K] in [0, 1]."""
        return self.log_kernel(self.embed(features)).exp()

    @torch.no_grad()
    def update_centroids(self, features: torch.Tensor, onehot: torch.Tensor) -> None:
        """EMA step on a batch: features [B, in], onehot [B, K] float."""
        onehot = onehot.to(features.dtype)
        z = self.embed(features)  # [B, emb, K]
        self.N.mul_(self.gamma).add_((1 - self.gamma) * onehot.sum(0))
        self.m.mul_(self.gamma).add_((1 - self.gamma) * torch.einsum("bek,bk->ek", z, onehot))


class DUQNet(nn.Module):
    """ResNet-18 trunk (globally pooled 8w features) + DUQHead; forward(x) -> K [B, K]."""

    def __init__(self, trunk: ResNet18, num_classes: int, embedding_size: int = 256, length_scale: float = 0.5,
                 gamma: float = 0.999) -> None:
        super().__init__()
        self.trunk = trunk
        self.trunk.fc = nn.Identity()
        self.head = DUQHead(trunk.widths[-1], num_classes, embedding_size, length_scale, gamma)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[0,1] pixels -> pooled trunk features [B, 8w]."""
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def log_kernel(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.log_kernel(self.head.embed(self.features(x)))
