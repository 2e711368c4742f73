"""Per-query Adam for batched generator parameters.

Every parameter handled here has the query as dim 0 (``[B, ...]``). ``RowAdam.step(rows)``
updates only those rows, with per-row moment estimates and per-row step counts (bias
correction), so

* a query that has stopped is frozen exactly (bit-identical), and
* a query's trajectory never depends on which other rows are being optimised.

The update is the one of ``torch.optim.Adam`` (no weight decay, no amsgrad), written with the
same operation order so that a single row reproduces it up to float round-off.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def _row_index(rows: Tensor | Iterable[int] | None, batch: int, device: torch.device) -> Tensor | None:
    """``rows`` as a LongTensor of row ids, or ``None`` for all rows (the fast path)."""
    if rows is None:
        return None
    rows = torch.as_tensor(rows, device=device)
    if rows.dtype == torch.bool:
        if rows.shape != (batch,):
            raise ValueError(f"boolean row mask must have shape ({batch},), got {tuple(rows.shape)}")
        rows = rows.nonzero().flatten()
    return rows.long().flatten()


class RowAdam:
    """Adam over batched tensors whose dim 0 is the query.

    Args:
        params: tensors ``[B, ...]`` (leaf tensors with ``requires_grad``), all with the same B.
        lr: base learning rate.
        betas, eps: as in ``torch.optim.Adam``.
        lr_scale: optional ``[B]`` per-query multiplier of ``lr`` (mutable attribute).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_scale: Tensor | None = None,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("RowAdam got no parameters")
        sizes = {p.shape[0] for p in self.params}
        if len(sizes) != 1:
            raise ValueError(f"all parameters must share the query dim 0, got sizes {sorted(sizes)}")
        self.batch_size = sizes.pop()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.lr_scale = lr_scale
        # Step counts are per parameter and per row, as torch.optim.Adam counts per parameter.
        device = self.params[0].device
        self.steps = [torch.zeros(self.batch_size, dtype=torch.long, device=device) for _ in self.params]
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, rows: Tensor | Iterable[int] | None = None) -> None:
        """Update the given rows (unique ids or a ``[B]`` bool mask; ``None`` = all rows).

        Parameters without a gradient are skipped, and so are their step counts."""
        beta1, beta2 = self.betas
        idx = _row_index(rows, self.batch_size, self.params[0].device)
        if idx is not None and idx.numel() == 0:
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            full = idx is None
            grad = p.grad if full else p.grad[idx]
            m = self.exp_avg[i] if full else self.exp_avg[i][idx]
            v = self.exp_avg_sq[i] if full else self.exp_avg_sq[i][idx]
            steps = self.steps[i] if full else self.steps[i][idx]
            steps += 1
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

            # Bias corrections per row, in float64 like the Python scalars of torch.optim.Adam.
            t = steps.double()
            bias1 = 1 - beta1**t
            bias2_sqrt = (1 - beta2**t).sqrt()
            step_size = self.lr / bias1
            if self.lr_scale is not None:
                step_size = step_size * (self.lr_scale if full else self.lr_scale[idx]).double()
            shape = (-1,) + (1,) * (p.dim() - 1)
            denom = (v.sqrt() / bias2_sqrt.to(v.dtype).view(shape)).add_(self.eps)
            update = m / denom * step_size.to(p.dtype).view(shape)
            if full:
                p.sub_(update)
            else:
                p.index_add_(0, idx, update, alpha=-1)
                self.exp_avg[i].index_copy_(0, idx, m)
                self.exp_avg_sq[i].index_copy_(0, idx, v)
                self.steps[i].index_copy_(0, idx, steps)
