"""Batched Fourier-feature SIREN (Tancik et al. 2020 + Sitzmann et al. 2020): B independent MLPs.

Query i represents its image as x_i(v) = sigmoid(W_out h_D(v) + b_out) with

    gamma_i(v) = [cos(2 pi B_i v), sin(2 pi B_i v)]        v in [0,1)^2, B_i [F, 2] ~ N(0, sigma^2)
    h_1 = sin(first_omega0 * (W_1 gamma_i(v) + b_1))
    h_k = sin(omega0 * (W_k h_{k-1} + b_k))                 k = 2..D

Each layer stores the weights of all queries as ``[B, in, out]`` and runs them as one
``torch.baddbmm`` over ``[b, N, in]`` activations (N = H*W pixels). The Fourier features of all
queries are computed once (``features`` buffer ``[B, N, 2F]``) from a shared pixel grid.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn


def _rows(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else t[idx]


def pixel_grid(height: int, width: int, size: tuple[int, int] | None = None) -> Tensor:
    """[h*w, 2] coordinates (row, column) / full size in [0, 1)^2, row-major pixel order.

    ``size=(h, w)`` (default the full ``height x width``) samples a coarser grid whose pixel i
    sits where ``F.interpolate(..., mode="bilinear", align_corners=False)`` puts it when the
    h x w image is enlarged back to height x width: at full-pixel position (i + 0.5) f - 0.5,
    f = height / h. The full grid (f = 1) is pixel i at i / height."""
    h, w = size or (height, width)
    ys = ((torch.arange(h) + 0.5) * (height / h) - 0.5) / height  # the default dtype (float32 unless float64)
    xs = ((torch.arange(w) + 0.5) * (width / w) - 0.5) / width
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


class _SineAffine(torch.autograd.Function):
    """sin(omega * (h @ W + b)) for h [b, N, in], W [b, in, out], b [b, 1, out].

    Same function as autograd's ``torch.sin(omega * torch.baddbmm(b, h, W))``, cheaper: omega
    scales the small W and b instead of the [b, N, out] activations (forward: one full-size
    pass less; backward: 4 full-size elementwise passes instead of 5, fewer temporaries).
    The sin/cos passes, not the matmuls, are what keeps the INR step from matmul speed on a
    CPU (``python -m disc_pl.bench``).

    ``dtype`` (bf16 or fp16 under ``inversion.precision``; None: the inputs' own): the matmuls
    run in it with float32 accumulation, and the sine argument z = h (omega W) + omega b is
    rounded once to it (relative error 2^-9 in bf16, ~0.005 rad at |z| = 2.5; SIREN's init
    keeps z near N(0, 1)). sin and cos are evaluated in float32; the weight and bias gradients
    come back in the parameters' dtype."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, omega: float, dtype: torch.dtype | None = None
                ) -> Tensor:
        w, b = weight * omega, bias * omega
        if dtype is not None:
            h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
        z = torch.baddbmm(b, h, w)
        ctx.save_for_backward(h, w, z)
        ctx.omega, ctx.param_dtype = omega, weight.dtype
        return torch.sin(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, z = ctx.saved_tensors
        omega = ctx.omega
        grad_z = torch.cos(z).mul_(grad.to(z.dtype))  # d sin(z), without the omega factor
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.bmm(grad_z, w.transpose(1, 2))  # w holds omega
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(h.transpose(1, 2), grad_z).to(ctx.param_dtype).mul_(omega)
        if ctx.needs_input_grad[2]:
            grad_b = grad_z.sum(1, keepdim=True, dtype=torch.float32).to(ctx.param_dtype).mul_(omega)
        return grad_h, grad_w, grad_b, None, None


def _sine_affine(h: Tensor, weight: Tensor, bias: Tensor, omega: float, dtype: torch.dtype | None) -> Tensor:
    return _SineAffine.apply(h, weight, bias, omega, dtype)


@functools.cache
def compiled_sine_affine():
    """``_sine_affine`` through ``torch.compile`` (inductor, dynamic shapes: the batch shrinks
    as queries finish and the grid changes between stages), built once per process on first
    use. Inductor fuses the elementwise passes around the matmuls (omega scaling, sin, and in
    the backward cos * grad with the bias gradient's sum). It needs a C++ compiler on a CPU
    (Triton on CUDA); where it cannot build, the first call raises an error that says so and
    how to run without it."""
    return torch.compile(_sine_affine, dynamic=True)


@functools.cache
def _compile_errors() -> tuple[type[Exception], ...]:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    return BackendCompilerFailed, InductorError


def _run_compiled(*args) -> Tensor:
    try:
        return compiled_sine_affine()(*args)
    except _compile_errors() as err:  # evaluated only when something was raised
        raise RuntimeError(f"prior.hparams.compile=true: torch.compile could not build the INR's sine layers "
                           f"here ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                           "Install a C++ compiler (Debian: apt-get install g++; CUDA needs Triton), or set "
                           "prior.hparams.compile=false (eager, the default)") from err


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``t``'s device (None when autocast is off)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class BatchedLinear(nn.Module):
    """B independent linear maps [b, N, in] -> [b, N, out] with optional sin(omega * .)."""

    def __init__(self, batch: int, cin: int, cout: int, weight_bound: float, omega: float | None,
                 compile: bool = False) -> None:
        super().__init__()
        self.weight_bound, self.omega, self.compile = weight_bound, omega, compile
        self.weight = nn.Parameter(torch.empty(batch, cin, cout))
        self.bias = nn.Parameter(torch.empty(batch, 1, cout))

    @torch.no_grad()
    def reset_row(self, row: int, gen: torch.Generator) -> None:
        # SIREN init for the weights; biases as nn.Linear: U(-1/sqrt(in), 1/sqrt(in)).
        cin = self.weight.shape[1]
        self.weight[row] = (torch.rand(self.weight.shape[1:], generator=gen) * 2 - 1) * self.weight_bound
        self.bias[row] = (torch.rand(self.bias.shape[1:], generator=gen) * 2 - 1) / math.sqrt(cin)

    def forward(self, h: Tensor, idx: Tensor | None = None) -> Tensor:
        if self.omega is not None:
            run = _run_compiled if self.compile else _sine_affine
            return run(h, _rows(self.weight, idx), _rows(self.bias, idx), self.omega, _autocast_dtype(h))
        return torch.baddbmm(_rows(self.bias, idx), h, _rows(self.weight, idx))  # autocast decides


class BatchedFourierSiren(nn.Module):
    """B independent Fourier-feature SIRENs for H x W images with ``out_channels`` channels.

    Groups (input->output): ``hidden0 .. hidden{D-1}, out``. ``run_group(name, h, idx)`` maps
    activations ``[b, N, d]``; start from ``features`` (rows idx); ``out`` returns the image
    ``[b, C, H, W]`` in [0, 1].
    """

    def __init__(
        self,
        generators: list[torch.Generator],
        height: int,
        width: int,
        out_channels: int,
        n_frequencies: int,
        sigma: float,
        hidden: int,
        depth: int,
        omega0: float,
        first_omega0: float,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"INR depth must be >= 1 hidden layer, got {depth}")
        batch = len(generators)
        self.height, self.width = height, width
        freqs = torch.stack([torch.randn(2, n_frequencies, generator=g) * sigma for g in generators])
        # Derived from the seeds, so not saved in checkpoints.
        self.register_buffer("freqs", freqs, persistent=False)  # [B, 2, F]
        self.size = (height, width)  # the grid rendered now (set_size); the full one by default
        self.register_buffer("features", self.features_at(self.size), persistent=False)

        blocks: dict[str, nn.Module] = {}
        cin = 2 * n_frequencies
        for k in range(depth):
            omega = first_omega0 if k == 0 else omega0
            bound = 1.0 / cin if k == 0 else math.sqrt(6.0 / cin) / omega0
            blocks[f"hidden{k}"] = BatchedLinear(batch, cin, hidden, bound, omega, compile)
            cin = hidden
        blocks["out"] = BatchedLinear(batch, cin, out_channels, math.sqrt(6.0 / cin) / omega0, None)
        self.blocks = nn.ModuleDict(blocks)
        self.groups = tuple(blocks)
        for row, gen in enumerate(generators):
            for block in self.blocks.values():
                block.reset_row(row, gen)

    def features_at(self, size: tuple[int, int]) -> Tensor:
        """Fourier features ``[B, h*w, 2F]`` of every query on the ``size = (h, w)`` grid."""
        proj = 2 * math.pi * pixel_grid(self.height, self.width, size).to(self.freqs) @ self.freqs  # [B, N, F]
        return torch.cat([proj.cos(), proj.sin()], dim=-1)

    def set_size(self, size: tuple[int, int]) -> None:
        """Render on an h x w grid from now on: the network is continuous, so this is the same
        function sampled more coarsely (features recomputed, bit-identical for the same grid)."""
        if tuple(size) != self.size:
            self.size = (int(size[0]), int(size[1]))
            self.features = self.features_at(self.size)

    def run_group(self, name: str, h: Tensor, idx: Tensor | None = None) -> Tensor:
        h = self.blocks[name](h, idx)
        if name != "out":
            return h
        # [b, N, C] -> image [b, C, h, w] in [0, 1]
        # float32 pixels also under mixed precision
        return torch.sigmoid(h.float()).transpose(1, 2).reshape(h.shape[0], -1, *self.size)
