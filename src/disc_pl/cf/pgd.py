"""The adversarial reference: targeted PGD on pixels against the explained classifier.

No prior, no manifold term: ``x' = clip(x + delta, 0, 1)`` with ``|delta|_inf <= eps``, signed
gradient steps of ``alpha`` on the cross-entropy to the target. A query stops changing at the
first step where it meets the engine's success criterion (:func:`disc_pl.cf.engine.is_flipped`
with the same margin), so the result is the smallest-effort perturbation PGD finds. It is the
lower bound of the validity tables: it "fools this classifier" and nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from disc_pl.cf.engine import is_flipped


def targeted_pgd(classifier: nn.Module, x: Tensor, target: Tensor | int, margin: float = 0.0,
                 eps: float = 8 / 255, alpha: float = 1 / 255, steps: int = 100) -> tuple[Tensor, Tensor]:
    """(x' [B, C, H, W] in [0, 1], flipped [B] bool) for images ``x`` in [0, 1]."""
    if eps <= 0 or alpha <= 0 or steps < 1:
        raise ValueError(f"PGD needs eps > 0, alpha > 0 and steps >= 1 (got {eps}, {alpha}, {steps})")
    x = x.detach()
    tgt = torch.as_tensor(target, device=x.device).long().expand(x.shape[0])
    adv = x.clone()
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(steps):
            adv = adv.detach().requires_grad_(True)
            logits = classifier(adv)
            done = is_flipped(logits.detach(), tgt, margin)
            if bool(done.all()):
                break
            grad, = torch.autograd.grad(F.cross_entropy(logits, tgt, reduction="sum"), adv)
            step = (-alpha * grad.sign()) * (~done).view(-1, 1, 1, 1)
            adv = (x + (adv.detach() + step - x).clamp(-eps, eps)).clamp(0.0, 1.0)
    adv = adv.detach()
    with torch.no_grad():
        flipped = is_flipped(classifier(adv), tgt, margin)
    return adv, flipped
