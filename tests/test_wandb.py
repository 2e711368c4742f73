"""W&B (the default logger): an offline run lands under the job's output directory and holds the
summary metrics, per-term losses, results table and image grid; every job finishes its run."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf
from PIL import Image

from disc_pl import run as run_lib
from disc_pl import train as train_lib
from disc_pl import tracking
from test_run import TOY

SMALL = [o for o in TOY if not o.startswith("logger=")] + [
    "query.count=4", "query.batch_size=2", "inversion.steps_per_stage=10", "prior.recon.max_steps=20",
    "inversion.log_every=5"]


def offline_records(path: Path):
    """Protobuf records of a ``run-*.wandb`` file (what ``wandb sync`` uploads): a LevelDB-style
    log (7-byte header ':W&B' + magic + version, then 32 KiB blocks of crc|length|type|data)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload if kind == 4 else payload)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # "cf/flip_rate" may be stored as ["cf", "flip_rate"]


def read_offline_run(run_dir: Path) -> dict:
    run, summary, config, history = None, {}, {}, set()
    for record in offline_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history |= {_key(i) for i in record.history.item}
    return {"tags": list(run.tags), "group": run.run_group, "name": run.display_name, "project": run.project,
            "summary": summary, "config": config, "history": history}


@pytest.mark.slow
def test_offline_run_holds_metrics_losses_table_and_grid(tmp_path, cache_dir, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg([*SMALL, "manifold=dep", "logger=wandb", f"cache_dir={cache_dir}"])
    out = tmp_path / "job"
    with tracking.tracked_job(cfg):
        metrics = run_lib.run(cfg, out)
    assert wandb.run is None  # the job's run was finished

    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1  # under the job's output directory, ready for `wandb sync`
    got = read_offline_run(run_dirs[0])
    assert got["project"] == "disc_pl" and got["group"] == "synthetic_faces" and got["name"] == "job"
    assert set(got["tags"]) == {"dataset=synthetic_faces", "prior=inr", "manifold=dep", "space=lso"}
    assert got["config"]["prior"]["name"] == "inr" and got["config"]["query"]["count"] == 4
    for key in ("cf/flip_rate", "cf/queries", "cf/mse", "cf/steps"):
        assert got["summary"][key] == pytest.approx(metrics[key]), key
    assert got["summary"]["cf/progress"] == 1.0
    assert {"cf/loss_semantic", "cf/loss_manifold", "cf/loss_functional", "cf/loss_total"} <= got["history"]

    files = run_dirs[0] / "files" / "media"
    table = json.loads(next(files.glob("table/**/*.table.json")).read_text())
    ids = [r["query_id"] for r in csv.DictReader((out / "results.csv").open())]
    assert {"query_id", "status", "target_prob", "mse"} <= set(table["columns"])
    col = table["columns"].index("query_id")
    assert [str(row[col]) for row in table["data"]] == ids
    grid = next(files.glob("images/**/*.png"))
    with Image.open(grid) as img, Image.open(out / "grid.png") as ref:
        assert img.size == ref.size


def test_tracked_job_finishes_the_run_even_when_the_job_fails(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.tracked_job(OmegaConf.create({"threads_per_job": None})):
            wandb.init(project="disc_pl", dir=str(tmp_path), mode="offline")
            raise RuntimeError("boom")
    assert wandb.run is None


def test_wandb_is_the_default_logger_and_follows_the_job(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_cfg = compose_cfg(["prior=dip", "manifold=duq", "space=iso", "experiment_name=table1"])
    logger = tracking.build_logger(run_cfg.logger, tmp_path / "a", default_group="synthetic_faces")
    assert isinstance(logger, WandbLogger)  # created lazily: no wandb.init until something is logged
    init = logger._wandb_init
    assert init["dir"] == str(tmp_path / "a") and init["name"] == "a" and init["mode"] == "disabled"
    assert init["group"] == "table1" and init["project"] == "disc_pl"
    assert init["tags"] == ["dataset=synthetic_faces", "prior=dip", "manifold=duq", "space=iso"]

    train_cfg = compose_cfg([], "train")
    logger = train_lib.build_logger(train_cfg.logger, tmp_path / "b", default_group="synthetic_faces")
    assert logger._wandb_init["tags"] == ["dataset=synthetic_faces", "model=classifier"]  # no empty prior=
    assert logger._wandb_init["group"] == "synthetic_faces"

    monkeypatch.delenv("WANDB_MODE")
    assert compose_cfg([]).logger.mode == "offline"  # never online unless asked
    assert isinstance(tracking.build_logger(compose_cfg(["logger=csv"]).logger, tmp_path), CSVLogger)
    assert tracking.build_logger(compose_cfg(["logger=none"]).logger, tmp_path) is None
