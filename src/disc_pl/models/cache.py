"""Content-addressed model cache (loading lives in ``disc_pl.models.loading``).

A trained model lives in ``<cache_dir>/<kind>-<key16>/`` with ``model.ckpt`` (or
``posthoc_dep.pt`` for a bring-your-own classifier), ``metrics.json`` and ``config.yaml``.
``key`` is the sha256 of everything that determines the model:
- the model yaml, recipe included (``fit`` / ``posthoc_dep``), and the content hash of a
  bring-your-own model file (``path``);
- the data: the datamodule's ``fingerprint()`` and its batch size;
- the trainer group minus presentation keys (progress bar, logging cadence, ...) and minus
  placement keys (accelerator, devices, num_nodes, strategy): a model trained on one CPU is
  reused by a DDP or GPU generation run of the same recipe. Precision stays in;
- the seed.
The logger is not part of the key.

Entries are written atomically: training runs in a hidden temp folder that is renamed into
place only when complete, so a killed training never leaves a half entry. A lock file
(``os.open(O_CREAT | O_EXCL)``, holding host and pid, its mtime refreshed by the holder; a lock whose
process is gone, or of another host that stopped refreshing it, is broken)
stops two jobs of a sweep from training the same model at once: the second waits, then reuses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.utils import instantiate
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from disc_pl.cf.results import atomic_torch_save, write_json
from disc_pl.errors import UnsafeCheckpointError  # noqa: F401 (re-exported)
from disc_pl.models.loading import load_classifier, load_duq, safe_load  # noqa: F401 (re-exported)
from disc_pl.utils import config_hash, to_plain

log = logging.getLogger(__name__)

# Trainer keys that do not change the trained weights.
TRAINER_PRESENTATION_KEYS = frozenset(
    {
        "enable_progress_bar",
        "enable_model_summary",
        "log_every_n_steps",
        "logger",
        "callbacks",
        "default_root_dir",
        "enable_checkpointing",
        "profiler",
        "num_sanity_val_steps",
        # Where the model is trained, not what: placement must not split the cache.
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
    }
)
ARTIFACT_NAMES = ("model.ckpt", "posthoc_dep.pt")
# (model_cfg, dataset_cfg, trainer_cfg, seed, out_dir, logger_cfg, datamodule) -> metrics
TrainModelFn = Callable[..., Any]
FILE_KEYS = ("path", "weights")  # model-yaml keys naming a user file (bring-your-own)


def model_kind(model_cfg: DictConfig) -> str:
    """`name` of the model yaml (classifier | duq | byo), else the target's last component."""
    name = model_cfg.get("name") or str(model_cfg.get("_target_", "model")).rsplit(".", 1)[-1]
    return str(name).lower()


def model_key(model_cfg: DictConfig, datamodule: Any, trainer_cfg: DictConfig | None, seed: int) -> str:
    """sha256 hex of the config that determines the model (see module docstring)."""
    trainer = {k: v for k, v in to_plain(trainer_cfg or {}).items() if k not in TRAINER_PRESENTATION_KEYS}
    model = to_plain(model_cfg)
    # A bring-your-own model is its file: key on the content, not just the path.
    files = {k: _file_digest(v) for k, v in model.items() if k in FILE_KEYS and v and Path(str(v)).is_file()}
    payload = {
        "kind": model_kind(model_cfg),
        "model": model,
        "files": files,
        "data": {"fingerprint": datamodule.fingerprint(), "batch_size": int(datamodule.batch_size)},
        "trainer": trainer,
        "seed": int(seed),
    }
    return config_hash(payload)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _distributed_rank() -> int:
    """Global rank announced by a launcher (torchrun, SLURM tasks, Lightning's DDP children)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(var)
        if value not in (None, "") and int(value) != 0:
            return int(value)
    return 0


def _lock_is_stale(path: Path, stale_after_s: float) -> str | None:
    """Why the lock at ``path`` is stale (None: it is held). Same host: its process is gone.
    Another host (a shared file system): its holder stopped refreshing its age (mtime) for
    ``stale_after_s`` -- a live holder touches it every ``stale_after_s / 4``."""
    try:
        host, pid = path.read_text().split()
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None  # being written (or just released): look again
    if host != socket.gethostname():
        return f"host {host} has not refreshed it for {age:.0f} s" if age > stale_after_s else None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        return None
    return None


def _heartbeat(path: Path, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        try:
            os.utime(path)
        except OSError:
            return


@contextmanager
def file_lock(path: Path, timeout_s: float = 6 * 3600, poll_s: float = 1.0,
              stale_after_s: float = 600.0) -> Iterator[None]:
    """Exclusive lock file holding ``host pid``; waits (polling) while another live process holds
    it. The holder refreshes the file's mtime, so a lock of a dead host is broken by its age."""
    path = Path(path)
    start = time.monotonic()
    announced = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            why = _lock_is_stale(path, stale_after_s)
            if why:
                log.warning("breaking stale lock %s (%s)", path, why)
                path.unlink(missing_ok=True)
                continue
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"waited {timeout_s:.0f} s for {path}; delete it if no training is running") from None
            if not announced:
                log.info("waiting for %s (another job is training this model)", path)
                announced = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        break
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stale_after_s / 4, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        path.unlink(missing_ok=True)


def _artifact(entry: Path) -> Path | None:
    for name in ARTIFACT_NAMES:
        if (entry / name).is_file():
            return entry / name
    return None


def ensure_model(
    model_cfg: DictConfig,
    dataset_cfg: DictConfig,
    trainer_cfg: DictConfig,
    seed: int,
    cache_dir: str | os.PathLike,
    *,
    train_fn: TrainModelFn,
    logger_cfg: DictConfig | None = None,
    datamodule: Any = None,
    wait_timeout_s: float = 6 * 3600,
) -> Path:
    """Path of the cached model for this config; trains it with ``train_fn`` if missing.

    ``train_fn(model_cfg, dataset_cfg, trainer_cfg, seed, out_dir, logger_cfg, datamodule)``
    writes the model's files into ``out_dir`` (``disc_pl.models.fit.train_model``; the cache
    does not know how models are trained). `datamodule` (built from dataset_cfg) may be passed
    to avoid building the data twice. Under a multi-process launcher, every rank trains (they
    form the DDP group) but only rank 0 takes the lock and publishes; the other ranks wait for
    the entry to appear.
    """
    model_cfg = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(model_cfg)
    if datamodule is None:
        datamodule = instantiate(dataset_cfg)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kind = model_kind(model_cfg)
    key = model_key(model_cfg, datamodule, trainer_cfg, seed)
    entry = cache_dir / f"{kind}-{key[:16]}"
    found = _artifact(entry)
    if found is not None:
        log.info("reusing cached %s model %s", kind, entry)
        return found

    def train_into(out_dir: Path) -> None:
        train_fn(model_cfg, dataset_cfg, trainer_cfg, seed, out_dir, logger_cfg, datamodule)

    if _distributed_rank() != 0:
        with tempfile.TemporaryDirectory(prefix=f".rank-{kind}-") as scratch:
            train_into(Path(scratch))
        deadline = time.monotonic() + 600
        while (found := _artifact(entry)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not publish {entry}")
            time.sleep(1.0)
        return found

    with file_lock(cache_dir / f".{entry.name}.lock", timeout_s=wait_timeout_s):
        found = _artifact(entry)
        if found is not None:  # trained by the job we waited for
            return found
        # Leftovers of a killed training of this entry (we hold the lock: nobody is writing).
        for stale in cache_dir.glob(f".tmp-{entry.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=cache_dir))
        try:
            log.info("training %s model into the cache: %s", kind, entry)
            train_into(tmp)
            if _artifact(tmp) is None:
                raise RuntimeError(f"training finished without writing a model into {tmp}")
            if entry.exists():  # an incomplete folder someone made by hand
                shutil.rmtree(entry)
            os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a cache may be shared
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _artifact(entry)  # type: ignore[return-value]


def cached_net(cache_dir: Path, kind: str, key: dict[str, Any], build: Callable[[], nn.Module],
               fit: Callable[[nn.Module], None]) -> nn.Module:
    """``build()`` with the weights cached under ``<cache_dir>/<kind>-<hash(key)>/<kind>.pt``;
    when missing, ``fit`` trains a fresh ``build()`` (in a forked RNG) and the entry is written
    atomically (a lock keeps parallel sweep jobs from training it twice). Eval mode, frozen."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / f"{kind}-{config_hash({'kind': kind, **key})[:16]}"
    with file_lock(cache_dir / f".{entry.name}.lock"):
        if not (entry / f"{kind}.pt").is_file():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(key.get("seed", 0)))
                net = build()
                fit(net)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=cache_dir))
            atomic_torch_save(net.state_dict(), tmp / f"{kind}.pt")
            write_json(tmp / "config.json", key)
            os.chmod(tmp, 0o755)
            if entry.exists():
                shutil.rmtree(entry)
            os.rename(tmp, entry)
    net = build()
    net.load_state_dict(torch.load(entry / f"{kind}.pt", map_location="cpu", weights_only=True))
    return net.eval().requires_grad_(False)
