"""What a search returns for a batch of queries (``CounterfactualBatch``) and the success test
(``is_flipped``): the lowest part of the engine, shared by ``cf.search`` and ``cf.engine``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

FLIPPED, NOT_FLIPPED, DIVERGED = "flipped", "not_flipped", "diverged"


@dataclass
class CounterfactualBatch:
    """What the engine returns for B queries (all tensors on CPU)."""

    images: Tensor                 # [B, C, H, W] counterfactuals (best valid or best attempt)
    status: list[str]              # flipped | not_flipped | diverged
    source: Tensor                 # [B] class predicted for the query
    target: Tensor                 # [B]
    initial_prob: Tensor           # [B] p(target | query)
    target_prob: Tensor            # [B] p(target | counterfactual)
    prediction: Tensor             # [B] argmax F(counterfactual)
    steps: Tensor                  # [B] counterfactual-stage optimisation steps taken
    recon_psnr: Tensor             # [B] PSNR of the reconstruction stage (dB)
    seconds: Tensor                # [B] float64 wall time per query (its share of each step it ran)
    losses: dict[str, Tensor] = field(default_factory=dict)  # term -> [B] at the kept iterate
    localized: Tensor | None = None  # [B] bool: the kept image came from the gated search; None: no gate
    fallback: Tensor | None = None   # [B] bool: the kept image came from the fallback prior; None: none set
    refined: Tensor | None = None    # [B] bool: the kept image came from a second search in a region of its own
                                     # (prior.refine / retry_elsewhere); None: none can run
    relaxed: Tensor | None = None    # [B] bool: the kept image came from a relaxed prior (prior.retry_hparams)
    precision: str = "32"          # the precision it ran in (inversion.precision, resolved)

    def rows(self, rows: Sequence[int]) -> CounterfactualBatch:
        """The results of queries ``rows`` (in that order), as a batch of their own."""
        on = torch.tensor(list(rows), dtype=torch.long)

        def take(v: Tensor | None) -> Tensor | None:
            return None if v is None else v[on]

        return CounterfactualBatch(
            images=self.images[on], status=[self.status[i] for i in rows], source=self.source[on],
            target=self.target[on], initial_prob=self.initial_prob[on], target_prob=self.target_prob[on],
            prediction=self.prediction[on], steps=self.steps[on], recon_psnr=self.recon_psnr[on],
            seconds=self.seconds[on], losses={t: v[on] for t, v in self.losses.items()},
            localized=take(self.localized), fallback=take(self.fallback), refined=take(self.refined),
            relaxed=take(self.relaxed),
            precision=self.precision)


def _probs(logits: Tensor) -> Tensor:
    # at least float32 (half-precision logits), float64 logits stay float64
    return torch.softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))


def is_flipped(logits: Tensor, target: Tensor, margin: float) -> Tensor:
    """argmax = target and p_target - max_{c != target} p_c >= margin, per query ``[b]``."""
    p = _probs(logits)
    p_t = p.gather(1, target[:, None]).squeeze(1)
    other = p.scatter(1, target[:, None], -1.0).max(1).values
    return (p.argmax(1) == target) & (p_t - other >= margin)
