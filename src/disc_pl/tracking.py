"""What every job does around its work: thread limits, sweep bookkeeping, experiment logging.

Used by the entry points (``run.py``, ``train.py``):

* :func:`tracked_job` wraps a job's ``main``: limits torch threads so parallel sweep jobs do not
  oversubscribe the CPU, logs the sweep job's index, and always calls ``wandb.finish()`` at the
  end (also on exceptions) so the jobs of a multirun never log into each other's W&B run.
* :func:`build_logger` instantiates the ``logger`` group (``wandb`` default, ``csv``, ``none``)
  with its files under the job's output directory.
* :func:`log_job_outputs` sends a finished run's figures to the logger: summary metrics, and on
  W&B the image grid (``wandb.Image``) and the per-query results (``wandb.Table``).
* :func:`tracked_figure` (run, evaluate) ends the console with the job's summary
  (``disc_pl.console``); :func:`tracked_job` keeps third-party noise off it unless ``debug=true``.
"""
from __future__ import annotations

import logging
import math
import os
import contextlib
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.exceptions import SIGTERMException

from disc_pl import console
from disc_pl.allocator import retained_heap
from disc_pl.utils import configure_matmul_precision, to_plain

log = logging.getLogger(__name__)


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / SLURM / container affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _hydra() -> DictConfig | None:
    return HydraConfig.get() if HydraConfig.initialized() else None


def job_threads(cfg: DictConfig) -> int | None:
    """torch threads for this job: ``threads_per_job`` if set, else cores // parallel jobs when
    the launcher runs several jobs at once (``hydra/launcher=local``: ``n_jobs``), else None
    (torch's default: every core)."""
    explicit = cfg.get("threads_per_job")
    if explicit is not None:
        if int(explicit) < 1:
            raise ValueError(f"threads_per_job={explicit} must be >= 1 (or null for automatic)")
        return int(explicit)
    hydra_cfg = _hydra()
    n_jobs = hydra_cfg.launcher.get("n_jobs") if hydra_cfg is not None else None
    if not n_jobs:
        return None
    cores = available_cores()
    n_jobs = cores if int(n_jobs) < 0 else int(n_jobs)  # joblib: -1 = one job per core
    return max(1, cores // n_jobs)


def finish_wandb(exit_code: int = 0) -> None:
    """End the current W&B run, if this process has one (no-op when wandb was never used)."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    wandb.finish(exit_code=exit_code)
    # finish() can return before the offline run file is fully written (wandb-core flushes in
    # the background); shutting the service down flushes it, so a finished job's files are
    # complete (and `wandb sync`-able) when it returns. The next job starts a new service.
    wandb.teardown()


@contextmanager
def tracked_job(cfg: DictConfig) -> Iterator[None]:
    """Wrap one job: thread limit, numeric precision (TF32 on GPUs, set once here for the whole
    job, cache-warm or not), the C allocator's reuse of freed memory (``cpu_allocator``), sweep
    index in the log, ``wandb.finish()`` whatever happens."""
    configure_matmul_precision()
    threads, previous = job_threads(cfg), torch.get_num_threads()
    allocator = contextlib.ExitStack()
    heap = allocator.enter_context(retained_heap(cfg.get("cpu_allocator", "retain")))
    log.debug("cpu_allocator=%s (glibc keeps freed memory: %s)", cfg.get("cpu_allocator", "retain"), heap)
    if threads is not None:
        torch.set_num_threads(threads)
    hydra_cfg = _hydra()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        log.info("sweep job #%s (%s) -> %s, %d torch threads", hydra_cfg.job.num,
                 hydra_cfg.job.override_dirname or "no overrides", hydra_cfg.runtime.output_dir,
                 torch.get_num_threads())
    failed = True
    allocator.enter_context(console.quiet(bool(cfg.get("debug", False))))  # until after wandb.finish()
    try:
        yield
        failed = False
    except SIGTERMException as err:
        # Lightning stops a fit on SIGTERM by raising SystemExit without a code (exit 0);
        # a job stopped half-way must not look like a success to a scheduler or a sweep.
        if err.code in (None, 0):
            log.warning("SIGTERM received: the job stopped before finishing (exit 143)")
            raise SystemExit(143) from err
        raise
    finally:
        finish_wandb(exit_code=1 if failed else 0)
        torch.set_num_threads(previous)  # the next job of a sequential sweep decides its own
        allocator.close()  # glibc's defaults again (the kept memory goes back to the system); the noise back on


def build_logger(logger_cfg: DictConfig | None, out_dir: str | Path, default_group: str | None = None) -> Any:
    """The ``logger`` group instantiated with ``save_dir = out_dir``; None for ``logger=none``.

    Tags left empty by the config (``prior=`` in a training job, which has no prior) are
    dropped, a W&B run without a name is named after the output folder, and one without a
    group (no experiment_name) gets ``default_group`` (the entry points pass the dataset name)."""
    if logger_cfg is None or "_target_" not in logger_cfg:
        return None
    kwargs: dict[str, Any] = {"save_dir": str(out_dir)}
    if "group" in logger_cfg and logger_cfg.group is None and default_group is not None:
        kwargs["group"] = str(default_group)
    if "tags" in logger_cfg:
        tags = OmegaConf.to_container(logger_cfg.tags, resolve=True) or []
        kwargs["tags"] = [str(t) for t in tags if t and not str(t).endswith("=")]
    if "name" in logger_cfg and logger_cfg.name is None:
        kwargs["name"] = Path(out_dir).name
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    logger = instantiate(logger_cfg, **kwargs)
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and logger._wandb_init.get("anonymous") is None:
        # Lightning always passes wandb.init an `anonymous` argument, which wandb deprecated and
        # warns about (before it reads WANDB_SILENT); unset, it means nothing: leave it out.
        logger._wandb_init.pop("anonymous", None)
    return logger


def loggable_config(cfg: DictConfig) -> dict[str, Any]:
    """The job config as plain values for the logger's hyper-parameters (the ``logger`` node
    left out); a value that needs the Hydra runtime to resolve, outside a job, is marked so."""
    plain: dict[str, Any] = {}
    for key in cfg:
        if key in ("logger", "hydra"):
            continue
        try:
            plain[str(key)] = to_plain(cfg[key])
        except Exception:  # e.g. ${hydra:runtime.cwd} when called without a Hydra job
            plain[str(key)] = "<unresolved outside a Hydra job>"
    return plain


def _cell(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def log_job_outputs(logger: Any, metrics: Mapping[str, float], rows: Sequence[Mapping[str, Any]] = (),
                    images: Mapping[str, str | Path] | None = None) -> None:
    """Final figures of a job: metrics (all loggers); on W&B also run.summary, ``images``
    (key -> PNG file, as ``wandb.Image``) and ``rows`` as the table ``cf/results``."""
    if logger is None:
        return
    logger.log_metrics(dict(metrics))
    from pytorch_lightning.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    for key, path in (images or {}).items():
        if Path(path).is_file():
            logger.log_image(key=key, images=[str(path)], caption=[Path(path).name])
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        logger.log_table(key="cf/results", columns=columns,
                         data=[[_cell(row.get(c)) for c in columns] for row in rows])
    logger.experiment.summary.update({k: _cell(v) for k, v in metrics.items()})


class CloseGlooAtExit(pl.Callback):
    """Destroy a gloo process group when its process exits.

    Lightning registers this clean-up for NCCL only. A CPU (gloo) worker of ``ddp_spawn`` that
    exits with its group alive can abort in gloo's threads ("terminate called without an active
    exception", SIGABRT) after its work is done, which fails the whole launch."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import atexit

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo" \
                and not getattr(CloseGlooAtExit, "_registered", False):
            atexit.register(_destroy_process_group)
            CloseGlooAtExit._registered = True


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def tracked_figure(cfg: DictConfig, job: Callable[[DictConfig], dict], figure: str) -> float:
    """``job(cfg)`` inside :func:`tracked_job`; its metric ``figure`` (NaN if absent) is what a
    Hydra entry point's ``main`` returns (the sweep's objective)."""
    with tracked_job(cfg):  # thread limit, sweep job index, wandb.finish() even on errors
        metrics = job(cfg)
    print_summary(metrics)  # every logger has finished: these are the last lines of the console
    return float(metrics.get(figure, float("nan")))


def print_summary(metrics: Mapping[str, Any], out_dir: str | Path | None = None) -> None:
    """The job's summary (``console.summary``) on stdout, from rank 0 only (the other ranks of a
    DDP job return no metrics); ``out_dir``: the Hydra job's output directory unless given."""
    if not metrics or pl.utilities.rank_zero_only.rank != 0:
        return
    if out_dir is None and _hydra() is not None:
        out_dir = _hydra().runtime.output_dir
    text = console.summary(metrics, out_dir)
    if text:
        sys.stderr.flush()  # log lines written before it stay before it
        print(text, flush=True)
