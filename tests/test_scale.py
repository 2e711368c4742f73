"""Scale and operations: multi-process generation, parallel sweeps, the SLURM launcher config,
model-cache keys that ignore placement, and generation progress."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_cfg
from omegaconf import OmegaConf

from disc_pl import run as run_lib
from disc_pl.cf.progress import QueryProgress
from disc_pl.models.cache import model_key
from disc_pl.tracking import available_cores
from test_run import TOY

# TOY (tests/test_run.py) with a shorter schedule: 4 queries, 2 per batch.
SMALL = [*TOY, "query.count=4", "query.batch_size=2", "inversion.steps_per_stage=10", "prior.recon.max_steps=20"]


def read_results(out: Path) -> tuple[list[dict], dict]:
    rows = list(csv.DictReader((out / "results.csv").open()))
    return rows, torch.load(out / "counterfactuals.pt", weights_only=True)


@pytest.mark.slow
def test_two_process_ddp_generation_equals_one_process(tmp_path, cache_dir, one_thread, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each spawned rank: one thread, as this process
    single = compose_cfg([*SMALL, f"cache_dir={cache_dir}"])
    ddp = compose_cfg([*SMALL, f"cache_dir={cache_dir}", "trainer.strategy=ddp_spawn", "trainer.devices=2"])
    m1 = run_lib.run(single, tmp_path / "one")
    trained = sorted(cache_dir.glob("classifier-*"))  # the session cache holds other tests' models too
    m2 = run_lib.run(ddp, tmp_path / "two")  # spawns 2 gloo ranks; this process merges

    # Queries were sharded: each rank wrote its own part, and every query appears exactly once.
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("part-*.pt"))
    assert {re.match(r"part-r(\d+)-", p).group(1) for p in parts} == {"0", "1"}
    ids = [int(q) for p in (tmp_path / "two" / "parts").glob("part-*.pt")
           for q in torch.load(p, weights_only=True)["query_id"]]
    assert len(ids) == len(set(ids)) == 4

    rows1, t1 = read_results(tmp_path / "one")
    rows2, t2 = read_results(tmp_path / "two")
    assert [r["query_id"] for r in rows1] == [r["query_id"] for r in rows2]
    assert [r["status"] for r in rows1] == [r["status"] for r in rows2]
    assert [r["steps"] for r in rows1] == [r["steps"] for r in rows2]
    assert torch.equal(t1["query_id"], t2["query_id"])
    torch.testing.assert_close(t2["counterfactual"], t1["counterfactual"], atol=1e-4, rtol=0)
    assert m2["cf/queries"] == m1["cf/queries"] == 4 and m2["cf/flip_rate"] == m1["cf/flip_rate"]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["cf/queries"] == 4
    # The DDP run reused the classifier trained by the single-process run.
    assert sorted(cache_dir.glob("classifier-*")) == trained


def test_model_cache_key_ignores_placement_not_precision():
    data = SimpleNamespace(fingerprint=lambda: {"name": "toy"}, batch_size=64)
    model = OmegaConf.create({"name": "classifier", "width": 8})
    trainers = {t: compose_cfg([f"trainer={t}"]).trainer for t in ("cpu", "gpu", "ddp")}
    keys = {model_key(model, data, trainers[t], 0) for t in trainers}
    assert len(keys) == 1  # a model trained on one CPU is reused by a DDP / GPU generation run
    bf16 = OmegaConf.merge(trainers["cpu"], {"precision": "bf16-mixed"})
    assert model_key(model, data, bf16, 0) not in keys


def test_slurm_launcher_config_composes_without_submitting():
    cfg = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                       "trainer.devices=4", "trainer.num_nodes=2"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu"
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4  # one task (rank) per device
    assert launcher.nodes == 2
    assert launcher.timeout_min > 0 and launcher.mem_gb > 0 and launcher.cpus_per_task > 0


def test_local_launcher_config_is_joblib_with_two_jobs():
    cfg = compose_cfg(["hydra/launcher=local"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("joblib_launcher.JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.hydra.launcher.backend == "loky"


@pytest.mark.slow
def test_parallel_local_sweep_trains_the_model_once(tmp_path):
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    tiny = ["dataset.n_train=400", "dataset.n_val=100", "dataset.n_test=100", "models.classifier.width=8",
            "models.classifier.fit.trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "prior.recon.max_steps=10", "inversion.steps_per_stage=5", "query.count=2", "query.batch_size=2",
            "query.require_correct=false", "logger=csv"]
    cmd = [sys.executable, "-m", "disc_pl.run", "-m", "hydra/launcher=local", "hydra.launcher.n_jobs=2",
           "prior=tv,inr", "manifold=none,dep", *tiny, f"cache_dir={cache}", f"hydra.sweep.dir={sweep}",
           "hydra.sweep.subdir=job${hydra:job.num}"]  # the toy overrides would make too long a name
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    jobs = sorted(sweep.glob("job*"))
    assert [j.name for j in jobs] == ["job0", "job1", "job2", "job3"]
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["cf/queries"] == 2
    assert len(list(cache.glob("classifier-*"))) == 1 and not list(cache.glob("duq-*"))
    # Exactly one job trained the classifier; the others waited for it or found it done.
    logs = {j.name: (j / "run.log").read_text() for j in jobs}
    trained = [n for n, text in logs.items() if "training classifier model into the cache" in text]
    assert len(trained) == 1, logs
    assert all("reusing cached classifier" in text or "another job is training this model" in text
               for n, text in logs.items() if n not in trained)
    # Each job logged its sweep index and ran with cores // n_jobs torch threads.
    threads = max(1, available_cores() // 2)
    for n, text in logs.items():
        assert f"sweep job #{n[3:]} " in text and f"{threads} torch threads" in text


class _Recorder:
    def __init__(self) -> None:
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(dict(metrics))


def test_progress_reports_done_total_and_eta():
    logger = _Recorder()
    trainer = SimpleNamespace(is_global_zero=True, world_size=2, logger=logger, progress_bar_callback=None)
    progress = QueryProgress(total=10, already_done=2)  # 2 done by an earlier (resumed) run
    progress.on_predict_start(trainer, None)
    progress.on_predict_batch_end(trainer, None, None, {"query_id": [0, 1]}, 0)
    first = logger.logged[-1]
    assert first["cf/queries_done"] == 6 and first["cf/progress"] == pytest.approx(0.6)  # 2 + 2 ranks x 2
    assert first["cf/eta_s"] >= 0
    progress.on_predict_batch_end(trainer, None, None, {"query_id": [2, 3]}, 1)
    last = logger.logged[-1]
    assert last["cf/queries_done"] == 10 and last["cf/progress"] == 1.0 and last["cf/eta_s"] == 0
    # Other ranks count their queries but report nothing.
    quiet = SimpleNamespace(is_global_zero=False, world_size=2, logger=_Recorder(), progress_bar_callback=None)
    progress.on_predict_batch_end(quiet, None, None, {"query_id": [4]}, 2)
    assert quiet.logger.logged == []
