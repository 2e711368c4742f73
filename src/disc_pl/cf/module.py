"""Running the engine through the Lightning Trainer.

``InversionModule.predict_step`` optimises one batch of queries (each with its own generator)
and returns per-query rows; ``CounterfactualWriter`` persists every batch as soon as it is done
(each rank its own files), so the same code runs on CPU, one GPU or many GPUs / nodes, and a
killed run resumes. The Trainer must be built with ``inference_mode=False`` (gradients flow
inside ``predict_step``); ``InversionModule`` checks that.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torch.utils.data import Dataset

from disc_pl.cf.memory import available_mb, measure_mb, probe_options, queries_that_fit
from disc_pl.cf.engine import CounterfactualBatch, InversionOptions, PriorFactory, generate_counterfactuals
from disc_pl.cf.results import write_part
from disc_pl.metrics import functional as M

log = logging.getLogger(__name__)
# torch.cuda.OutOfMemoryError is an alias of torch.OutOfMemoryError in recent torch versions.
OOM_ERRORS = tuple({torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)})


def concat_batches(parts: Sequence[CounterfactualBatch]) -> CounterfactualBatch:
    """The engine outputs of consecutive slices of one batch, as one output (rows in order)."""
    def cat(values: list) -> Any:
        first = values[0]
        if first is None:  # `localized` without the gate
            return None
        if isinstance(first, Tensor):
            return torch.cat(values)
        if isinstance(first, list):
            return [v for part in values for v in part]
        if isinstance(first, dict):
            return {k: cat([v[k] for v in values]) for k in first}
        if isinstance(first, str) and all(v == first for v in values):  # `precision`: one per job
            return first
        raise TypeError(f"cannot concatenate {type(first).__name__} fields")
    return CounterfactualBatch(**{f.name: cat([getattr(p, f.name) for p in parts])
                                  for f in dataclasses.fields(CounterfactualBatch)})


class QueryDataset(Dataset):
    """Queries drawn from a dataset split: image, target, a stable id and a per-query seed.

    ``ground_truth`` (optional) = (cf_images [N,C,H,W], masks [N,1,H,W]) aligned with ``indices``.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], targets: Sequence[int], seed: int,
                 ground_truth: tuple[Tensor, Tensor] | None = None) -> None:
        if len(indices) != len(targets):
            raise ValueError("one target per query index is needed")
        self.base, self.indices, self.targets = base, list(indices), list(targets)
        self.seed = int(seed)
        self.ground_truth = ground_truth

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[self.indices[i]]
        qid = int(self.indices[i])
        out = {"image": item["image"], "label": item["label"], "query_id": qid,
               "target": self.targets[i], "seed": query_seed(self.seed, qid)}
        if self.ground_truth is not None:
            out["gt_image"] = self.ground_truth[0][i]
            out["gt_mask"] = self.ground_truth[1][i]
        return out


def query_seed(run_seed: int, query_id: int) -> int:
    """A query's generator seed: a function of the run seed and the query id only, so a query
    gets the same generator whichever batch, rank or resumed run processes it."""
    return (int(run_seed) * 1_000_003 + int(query_id) * 7_919 + 17) % (2**31 - 1)


def query_rows(batch: Mapping[str, Any], out, class_names: Sequence[str] | None) -> list[dict]:
    """One flat row per query: identity, outcome and figures (see docs/USER_GUIDE.md, results.csv)."""
    x, x_cf = batch["image"].detach().cpu(), out.images
    figures = {"mse": M.mse(x, x_cf), "concentration": M.concentration(x, x_cf)}
    if "gt_image" in batch:
        gt, mask = batch["gt_image"].cpu(), batch["gt_mask"].cpu().bool()
        figures["gt_distance"] = M.relative_gt_distance(x, x_cf, gt)
        figures["in_mask"] = M.in_mask_fraction(x, x_cf, mask)
        figures["mask_iou"] = M.mask_iou(x, x_cf, mask)
    name = (lambda c: class_names[c]) if class_names else str
    rows = []
    for i, status in enumerate(out.status):
        row = {"query_id": int(batch["query_id"][i]), "label": int(batch["label"][i]),
               "source": name(int(out.source[i])), "target": name(int(out.target[i])),
               "initial_prob": float(out.initial_prob[i]), "target_prob": float(out.target_prob[i]),
               "prediction": name(int(out.prediction[i])), "flipped": status == "flipped",
               "status": status,
               # empty without the gate (localize=none): the question does not apply
               "localized": bool(out.localized[i]) if out.localized is not None else "",
               # empty without prior.fallback: True where the fallback prior made the image
               "fallback": bool(out.fallback[i]) if out.fallback is not None else "",
               # empty where no second search can run (prior.refine / retry_elsewhere): True where its image was kept
               "refined": bool(out.refined[i]) if out.refined is not None else "",
               # empty without prior.retry_hparams: True where a relaxed prior's image was kept
               "relaxed": bool(out.relaxed[i]) if out.relaxed is not None else ""}
        row.update({k: float(v[i]) for k, v in figures.items()})
        row.update({"steps": int(out.steps[i]), "seconds": float(out.seconds[i]),
                    "recon_psnr": float(out.recon_psnr[i]), "precision": out.precision})
        row.update({f"loss_{t}": float(v[i]) for t, v in out.losses.items()})
        rows.append(row)
    return rows


class InversionModule(pl.LightningModule):
    """Generates counterfactuals in ``predict_step``; holds no trainable parameters of its own.

    The classifier (and manifold model) are submodules so the Trainer moves them to the device;
    each batch's generators are created, fitted and discarded inside ``predict_step``.
    """

    def __init__(self, classifier: nn.Module, manifold: nn.Module | None, prior: PriorFactory | str,
                 options: InversionOptions, class_names: Sequence[str] | None = None,
                 prior_name: str | None = None, memory_fraction: float | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.manifold = manifold
        self.prior = prior  # the run's generator factory (images, seeds) -> Prior, built once
        self.prior_name = prior_name or (prior if isinstance(prior, str) else getattr(prior, "func", prior).__name__)
        self.options = options
        self.class_names = list(class_names) if class_names else None
        self._log_step = 0
        self.split_batch_sizes: list[int] = []  # batches that ran out of GPU memory and were halved
        # First guess of the batch that fits (query.memory_fraction of the free memory; None: off):
        # measured on the first batch by a few-step probe, then every batch is run in chunks of
        # at most `max_queries` (None: the whole batch fits).
        self.memory_fraction = memory_fraction
        self.max_queries: int | None = None
        self.memory_per_query_mb: float | None = None
        self._probed = memory_fraction is None

    def _log(self, stats: dict[str, float]) -> None:
        self._log_step += 1
        if self.logger is not None:
            self.logger.log_metrics(stats, step=self._log_step)
        # Lightning calls callbacks per batch only; a batch optimises for minutes, so callbacks
        # that define on_inversion_step (QueryProgress) also hear of every logged step.
        trainer = self._trainer
        for callback in (trainer.callbacks if trainer is not None else ()):
            if hasattr(callback, "on_inversion_step"):
                callback.on_inversion_step(trainer, self, stats)

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("InversionModule needs Trainer(inference_mode=False): counterfactual "
                               "generation backpropagates inside predict_step")
        with torch.enable_grad():
            n = len(batch["image"])
            if not self._probed:
                self._probe_memory(batch)
            step = self.max_queries or n
            chunks = [self._generate(batch, i, min(i + step, n)) for i in range(0, n, step)]
            out = chunks[0] if len(chunks) == 1 else concat_batches(chunks)
        return {"rows": query_rows(batch, out, self.class_names),
                "query_id": torch.as_tensor(batch["query_id"]).cpu(),
                "query": batch["image"].detach().cpu(), "counterfactual": out.images}

    def _probe_memory(self, batch: Mapping[str, Any]) -> None:
        """Measure the memory one query takes (a probe of 2 queries, one step per stage; the
        global RNG restored) and cap the batch at what ``memory_fraction`` of the free memory
        holds. Nothing changes where the whole batch fits (the usual case)."""
        self._probed = True
        n, device = len(batch["image"]), batch["image"].device
        free = available_mb(device)
        k = min(n, 2)
        if n < 2 or free is None:
            return
        probe = probe_options(self.options)
        try:
            used = measure_mb(lambda: generate_counterfactuals(
                self.classifier, batch["image"][:k], batch["target"][:k], prior=self.prior, manifold=self.manifold,
                options=probe, seeds=[int(s) for s in batch["seed"][:k]]), device)
        except OOM_ERRORS:
            used, self.max_queries = None, 1  # 2 do not fit: one at a time (its own error if 1 does not)
            log.warning("the memory probe of %d queries ran out of memory: optimising one query at a time", k)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if used is None:
            if self.max_queries != 1:
                log.warning("query.memory_fraction=%s: %s cannot window its peak memory here (on a CPU it needs a "
                            "Linux kernel that resets VmHWM through /proc/self/clear_refs), so the batch size is not "
                            "checked; set query.batch_size to what fits, or query.memory_fraction=null to silence "
                            "this", self.memory_fraction, device)
            return
        self.memory_per_query_mb = used / k
        fit = queries_that_fit(self.memory_per_query_mb, free, float(self.memory_fraction))
        if fit < n:
            self.max_queries = fit
            log.warning("query.batch_size=%d needs about %.0f MB (%.0f MB per query, measured) and %.0f MB "
                        "are free on %s: optimising %d queries at a time (query.memory_fraction=%.2f). "
                        "Set query.batch_size=%d to skip this check's guess", n, self.memory_per_query_mb * n,
                        self.memory_per_query_mb, free, device, fit, float(self.memory_fraction), fit)

    def _generate(self, batch: Mapping[str, Any], start: int, stop: int) -> CounterfactualBatch:
        """Counterfactuals for rows start..stop-1 of the batch. Out of GPU memory, the rows are
        split in halves and retried (recursively, down to one query): every query is still
        processed exactly once, with the results of a run at the smaller query.batch_size (by
        per-query independence, docs/ARCHITECTURE.md, those of the unsplit batch up to the
        round-off of batch-size dependent kernels)."""
        seeds = [int(s) for s in batch["seed"][start:stop]]
        try:
            return generate_counterfactuals(
                self.classifier, batch["image"][start:stop], batch["target"][start:stop],
                prior=self.prior, manifold=self.manifold,
                options=self.options, seeds=seeds, on_log=self._log)
        except OOM_ERRORS as err:
            if stop - start == 1:
                shape = "x".join(str(d) for d in batch["image"].shape[1:])
                raise type(err)(
                    f"out of GPU memory with a single query ({shape} image, prior={self.prior_name}): "
                    "query.batch_size=1 does not fit either. Use a smaller generator (prior.hparams), "
                    f"smaller images (dataset.image_size) or a GPU with more memory. ({err})") from err
        # Outside the except block, so the failed attempt's tensors (held by the traceback) are freed.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size, half = stop - start, start + (stop - start) // 2
        self.split_batch_sizes.append(size)
        log.warning("out of GPU memory optimising %d queries together; retrying as %d + %d. Set "
                    "query.batch_size=%d (or lower) to avoid the retries", size, half - start, stop - half,
                    size // 2)
        return concat_batches([self._generate(batch, start, half), self._generate(batch, half, stop)])

    def on_predict_end(self) -> None:
        if self.split_batch_sizes:
            log.warning("%d batch(es) ran out of GPU memory and were split; every query was processed. "
                        "Next time set query.batch_size=%d", len(self.split_batch_sizes),
                        max(1, min(self.split_batch_sizes) // 2))


class CounterfactualWriter(BasePredictionWriter):
    """Persists each finished batch at once (atomic file per batch and rank)."""

    def __init__(self, out_dir: str | Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        write_part(self.out_dir, trainer.global_rank, prediction["rows"], prediction["query_id"],
                   prediction["query"], prediction["counterfactual"])
        self.written += len(prediction["rows"])
        # Lightning's SIGTERM handler only sets a flag, and its predict loop never reads it: stop
        # here, with every finished batch on disk, and exit 143 (128 + SIGTERM) so the job is
        # not taken for a success. A rerun into the same directory resumes.
        if trainer.received_sigterm:
            log.warning("SIGTERM received: stopping after %d persisted queries; rerun into %s to resume",
                        self.written, self.out_dir)
            raise SIGTERMException(143)
