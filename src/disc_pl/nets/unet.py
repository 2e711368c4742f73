"""Batched Deep Image Prior "skip" encoder-decoder (Ulyanov et al. 2018): B independent nets.

Every layer holds the parameters of B queries as rows of one tensor (``weight [B, Cout, Cin,
k, k]``), and runs them as one grouped convolution on ``[1, b*Cin, H, W]``, so a batch of
queries costs one conv call per layer and query i never sees query j.

Architecture (reference ``skip()`` of the DIP code, per scale i = 0 finest .. S-1 coarsest):

    enc_i:  skip_i = ConvNormAct1x1(h)                          [b, skip, H_i, W_i]
            h      = ConvNormAct3x3(ConvNormAct3x3/stride2(h))  [b, ch, H_i/2, W_i/2]
    dec_i:  h = up2(h) ; h = Norm(cat(skip_i, h))                [b, skip+ch, H_i, W_i]
            h = ConvNormAct1x1(ConvNormAct3x3(h))                [b, ch, H_i, W_i]
    out:    x = sigmoid(Conv1x1(h))                              [b, C, H, W]

Normalisation: the reference uses BatchNorm in training mode on a batch of ONE image, which
normalises each channel over its pixels, i.e. it *is* instance normalisation with an affine
transform. We use exactly that, per query and per channel, so queries never couple.
Padding is zero padding (the ``skip()`` default).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = tuple[Tensor, ...]  # (h, skip_0, ..., skip_k): everything a later group still needs


def _rows(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else t[idx]


class BatchedConv2d(nn.Module):
    """B independent ``nn.Conv2d`` (zero padding k//2), PyTorch's default init per row."""

    def __init__(self, batch: int, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(torch.empty(batch, cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(batch, cout))

    @torch.no_grad()
    def reset_row(self, row: int, gen: torch.Generator) -> None:
        # nn.Conv2d default (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(self.weight[0, 0].numel())
        for p in (self.weight, self.bias):
            p[row] = (torch.rand(p.shape[1:], generator=gen) * 2 - 1) * bound

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        b, cin, h, w = x.shape  # x: [b, Cin, H, W] -> [b, Cout, H', W']
        weight = _rows(self.weight, idx)
        out = F.conv2d(
            x.reshape(1, b * cin, h, w),
            weight.reshape(-1, *weight.shape[2:]),
            _rows(self.bias, idx).reshape(-1),
            stride=self.stride,
            padding=self.padding,
            groups=b,
        )
        return out.view(b, -1, *out.shape[2:])


class BatchedInstanceNorm(nn.Module):
    """Per-query, per-channel normalisation over pixels, affine ``[B, C]`` (init 1, 0)."""

    def __init__(self, batch: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(batch, channels))
        self.bias = nn.Parameter(torch.zeros(batch, channels))

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        x = F.instance_norm(x, eps=self.eps)
        return x * _rows(self.weight, idx)[:, :, None, None] + _rows(self.bias, idx)[:, :, None, None]


class ConvNormAct(nn.Module):
    def __init__(self, batch: int, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = BatchedConv2d(batch, cin, cout, kernel, stride)
        self.norm = BatchedInstanceNorm(batch, cout)

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        return F.leaky_relu(self.norm(self.conv(x, idx), idx), 0.2)


class EncoderLevel(nn.Module):
    """State (h, skips...) -> (h at half resolution, skips..., skip of this level)."""

    def __init__(self, batch: int, cin: int, channels: int, skip_channels: int) -> None:
        super().__init__()
        self.skip = ConvNormAct(batch, cin, skip_channels, 1) if skip_channels else None
        self.down = ConvNormAct(batch, cin, channels, 3, stride=2)
        self.conv = ConvNormAct(batch, channels, channels, 3)

    def forward(self, state: State, idx: Tensor | None = None) -> State:
        h, *skips = state
        skip = self.skip(h, idx) if self.skip is not None else h[:, :0]
        return (self.conv(self.down(h, idx), idx), *skips, skip)


class DecoderLevel(nn.Module):
    """State (h, skips..., skip of this level) -> (h at double resolution, skips...)."""

    def __init__(self, batch: int, channels: int, skip_channels: int) -> None:
        super().__init__()
        self.norm = BatchedInstanceNorm(batch, skip_channels + channels)
        self.conv = ConvNormAct(batch, skip_channels + channels, channels, 3)
        self.conv1x1 = ConvNormAct(batch, channels, channels, 1)

    def forward(self, state: State, idx: Tensor | None = None) -> State:
        h, *skips, skip = state
        h = torch.cat([skip, F.interpolate(h, scale_factor=2, mode="nearest")], dim=1)
        return (self.conv1x1(self.conv(self.norm(h, idx), idx), idx), *skips)


class OutputLayer(nn.Module):
    def __init__(self, batch: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = BatchedConv2d(batch, channels, out_channels, 1)

    def forward(self, state: State, idx: Tensor | None = None) -> State:
        (h,) = state
        return (torch.sigmoid(self.conv(h, idx)),)


class BatchedSkipNet(nn.Module):
    """B independent DIP skip-nets; run group by group (``groups`` in input->output order).

    ``run_group(name, state, idx)`` maps a State to the next; start from ``(z,)`` with
    z ``[b, in_channels, H, W]``; after the last group the state is ``(image [b, C, H, W],)``.
    """

    def __init__(
        self,
        generators: list[torch.Generator],
        in_channels: int,
        out_channels: int,
        channels: int,
        skip_channels: int,
        scales: int,
    ) -> None:
        super().__init__()
        batch = len(generators)
        blocks: dict[str, nn.Module] = {}
        for i in range(scales):
            blocks[f"enc{i}"] = EncoderLevel(batch, in_channels if i == 0 else channels, channels, skip_channels)
        for i in reversed(range(scales)):
            blocks[f"dec{i}"] = DecoderLevel(batch, channels, skip_channels)
        blocks["out"] = OutputLayer(batch, channels, out_channels)
        self.blocks = nn.ModuleDict(blocks)
        self.groups = tuple(blocks)
        # Each query's weights come from its own generator only, in a fixed layer order.
        for row, gen in enumerate(generators):
            for module in self.modules():
                if isinstance(module, BatchedConv2d):
                    module.reset_row(row, gen)

    def run_group(self, name: str, state: State, idx: Tensor | None = None) -> State:
        return self.blocks[name](state, idx)
