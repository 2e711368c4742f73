"""Does the explained classifier cheat? Reliance on a planted cue, and whether counterfactuals
show it (issue 28).

A counterfactual explanation is *faithful* when it shows what the explained classifier really
uses, even a cue that a person (or a judge trained on clean data) would not call the class. The
synthetic faces can plant such a cue (``dataset.shortcut``: a small mark that co-occurs with
"smiling" in training, :mod:`disc_pl.data.synthetic`), with an exact mask and a renderer that
puts it on or takes it off any face. Two kinds of figures follow:

- **reliance** of the classifier, no counterfactual involved (:func:`reliance`): accuracy on the
  test faces as they are (``shortcut/acc_clean``, no cue: test faces never carry it), with the
  cue where training had it (``acc_cue_aligned``: on the smiling faces only) and where it
  misleads (``acc_cue_flipped``: on the non-smiling faces only), and per class with / without the
  cue. A classifier that ignores the cue has all of them equal; one that reads only the cue has
  ``acc_cue_aligned`` 1 and ``acc_cue_flipped`` 0.
- **faithfulness** per counterfactual x' of a query x (:func:`cue_figures`):
  ``on_cue`` = sum|x' - x| inside the cue's mask / sum|x' - x| (as ``in_mask`` for the mouth; to
  be read against ``shortcut/cue_area_share``, the mask's share of the image);
  ``cue_added`` = 1 where the explained classifier already predicts the target on the query with
  only the counterfactual's pixels inside the cue mask pasted in (``where(mask, x', x)``, the run's success
  criterion): the change on the cue region alone carries the flip, whatever it looks like;
  ``cue_corr`` = cosine between x' - x and the rendered cue's own change inside the mask (1: the
  mark itself was drawn; 0: no change there), whether what is drawn looks like the cue.

The job-level call that adds them to a run (rows, ``cf/*``, reference rows) is
:func:`disc_pl.shortcut.add_shortcut_figures`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from disc_pl.metrics import functional as FM

KEYS = ("on_cue", "cue_added", "cue_corr")  # per-query columns of results.csv


def _predict(classifier: nn.Module, x: Tensor, batch: int = 256) -> Tensor:
    with torch.no_grad():
        return torch.cat([classifier(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def reliance(classifier: nn.Module, dm: Any, split: str = "test", limit: int | None = 2000,
             batch: int = 256) -> dict[str, float]:
    """How much ``classifier`` relies on the planted cue of ``dm`` (module docstring), on the
    first ``limit`` images of ``split`` (all with None). The cue's class is ``dm.cue_class``.

    ``acc_target_cue`` / ``acc_target_no_cue``: accuracy on the cue class's images with / without
    the cue; ``acc_other_cue`` / ``acc_other_no_cue``: on the other images. ``acc_cue_aligned``
    and ``acc_cue_flipped`` pool the two matching halves over all images; ``acc_clean`` is the
    images as stored. Accuracy = argmax over all classes equals the label.
    """
    data = dm.dataset(split)
    n = len(data) if limit is None else min(int(limit), len(data))
    labels = torch.as_tensor(data.labels)[:n].long()
    is_target = labels == int(dm.cue_class)
    correct = {"clean": [], "cue": [], "no_cue": []}
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        y = labels[idx]
        stored = torch.stack([data[i]["image"] for i in idx])
        for name, x in (("clean", stored), ("cue", dm.with_cue(split, idx, True)),
                        ("no_cue", dm.with_cue(split, idx, False))):
            correct[name].append(_predict(classifier, x, batch) == y)
    hit = {k: torch.cat(v).float() for k, v in correct.items()}

    def mean(v: Tensor) -> float:
        return float(v.mean()) if len(v) else float("nan")

    aligned = torch.where(is_target, hit["cue"], hit["no_cue"])
    flipped = torch.where(is_target, hit["no_cue"], hit["cue"])
    return {"shortcut/acc_clean": mean(hit["clean"]), "shortcut/acc_cue_aligned": mean(aligned),
            "shortcut/acc_cue_flipped": mean(flipped),
            "shortcut/acc_target_cue": mean(hit["cue"][is_target]),
            "shortcut/acc_target_no_cue": mean(hit["no_cue"][is_target]),
            "shortcut/acc_other_cue": mean(hit["cue"][~is_target]),
            "shortcut/acc_other_no_cue": mean(hit["no_cue"][~is_target]),
            "shortcut/n_test": n}


def on_cue(x: Tensor, x_cf: Tensor, mask: Tensor) -> Tensor:
    """[B]: share of sum_c |x' - x| inside ``mask`` (bool [1 or B, 1, H, W]), as given (no
    dilation); NaN for no change at all."""
    return FM.in_mask_fraction(x, x_cf, mask.expand(len(x), 1, *mask.shape[-2:]), dilate=0)


def cue_added(classifier: nn.Module, x: Tensor, x_cf: Tensor, mask: Tensor, target: int,
              margin: float = 0.0) -> Tensor:
    """bool [B]: the classifier's verdict (target, with ``margin``) on the query with only the
    counterfactual's pixels inside ``mask`` pasted in (the run's success criterion:
    ``disc_pl.cf.engine.is_flipped`` is the same test)."""
    pasted = torch.where(mask, x_cf, x)
    with torch.no_grad():
        logits = torch.cat([classifier(pasted[i:i + 256]) for i in range(0, len(pasted), 256)])
    return FM.flipped(logits, int(target), float(margin))


def cue_corr(x: Tensor, x_cf: Tensor, cue_change: Tensor, mask: Tensor) -> Tensor:
    """[B]: cosine between the change x' - x and ``cue_change`` (the rendered cue's own change,
    [B, C, H, W]) over the pixels of ``mask`` and every channel; 0 where either is zero."""
    m = mask.expand(len(x), x.shape[1], *mask.shape[-2:])
    a, b = ((x_cf - x) * m).flatten(1), (cue_change * m).flatten(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-12), torch.zeros_like(den))


def cue_figures(classifier: nn.Module, x: Tensor, x_cf: Tensor, cue_change: Tensor, mask: Tensor,
                target: int, margin: float = 0.0) -> dict[str, Tensor]:
    """``{on_cue, cue_added, cue_corr}`` [B] each (module docstring)."""
    return {"on_cue": on_cue(x, x_cf, mask), "cue_added": cue_added(classifier, x, x_cf, mask, target, margin),
            "cue_corr": cue_corr(x, x_cf, cue_change, mask)}
