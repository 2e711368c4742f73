"""Persistence of counterfactual results: atomic, per batch, resumable, mergeable across ranks.

Layout of a run's output directory::

    parts/part-r<rank>-q<first query id>.pt   one file per finished batch (atomic rename)
    results.csv                                one row per query (merged, sorted by query id)
    counterfactuals.pt                         {"query_id", "query", "counterfactual"} tensors
    metrics.json                               aggregates (written by the entry point)

A part file is only ever visible complete (written to a temp name, fsynced, then renamed),
so a kill loses at most the batch in flight; a rerun skips every query id found in parts/.
Part files hold plain tensors and primitives and load with ``weights_only=True``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from disc_pl.errors import ConfigError, Problem, ResultsWriteError  # noqa: F401 (re-exported)
from disc_pl.utils import config_hash

PARTS = "parts"
STAMP = "config.json"  # parts/config.json: the config the parts were made with, and its hash


@contextmanager
def explain_write_errors(path: Path, run_dir: Path):
    """Re-raise an OSError while writing ``path`` as a ResultsWriteError saying where and what
    to do (the errno is kept: ``err.errno == errno.ENOSPC`` still works)."""
    try:
        yield
    except ResultsWriteError:
        raise
    except OSError as err:
        raise ResultsWriteError(
            err.errno, f"cannot write {path} ({err.strerror or err}): check free space and write "
            f"permission of {Path(path).parent}. Finished batches are kept in {Path(run_dir) / PARTS}; "
            f"rerun into the same directory (hydra.run.dir={run_dir}) to resume") from err


def ensure_writable_dir(run_dir: Path) -> None:
    """Fail at start-up, not after hours of training, if ``run_dir`` cannot take files."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=run_dir)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise ResultsWriteError(
            err.errno, f"the output directory {run_dir} cannot be written ({err.strerror or err}): check "
            "that it is a directory with free space and write permission, or choose another with "
            "hydra.run.dir=...") from err


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete temp files a killed run left in ``parts/`` (never visible as parts; call before
    generating, when nothing writes into the directory)."""
    stale = sorted((Path(run_dir) / PARTS).glob(".part-*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Path, obj: dict) -> None:
    """JSON with NaN/inf written as null (strict JSON readers choke on NaN)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    with explain_write_errors(path, Path(path).parent):
        atomic_write_text(path, json.dumps(clean(obj), indent=2, sort_keys=True) + "\n")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_config_stamp(out_dir: Path, config: dict[str, Any]) -> None:
    """Refuse to resume parts made under another config: the stamp a previous run left in
    ``parts/`` (``write_config_stamp``) must match the (flat, plain) ``config`` that determines
    the results, or a ``ConfigError`` names each differing key."""
    digest = config_hash(config)
    path = Path(out_dir) / PARTS / STAMP
    if path.is_file() and any((Path(out_dir) / PARTS).glob("part-*.pt")):
        stamped = json.loads(path.read_text())
        if stamped.get("hash") == digest:
            return digest
        old = stamped.get("config", {})
        problems = [Problem(key, config.get(key, "<absent>"),
                            f"the results in {out_dir} were made with {key}={json.dumps(old.get(key, '<absent>'))}; "
                            "rerun with that value to resume them, or write elsewhere (hydra.run.dir=...)")
                    for key in sorted(set(old) | set(config)) if old.get(key) != config.get(key)]
        raise ConfigError(problems or [Problem("output", str(out_dir), "its parts were made with another config")])


def write_config_stamp(out_dir: Path, config: dict[str, Any]) -> str:
    """Stamp ``parts/`` with the config its parts are made with (and its hash); returns the hash."""
    digest = config_hash(config)
    path = Path(out_dir) / PARTS / STAMP
    with explain_write_errors(path, Path(out_dir)):
        atomic_write_text(path, json.dumps({"hash": digest, "config": config}, indent=1, sort_keys=True) + "\n")
    return digest


def write_part(out_dir: Path, rank: int, rows: list[dict], query_ids: Tensor,
               queries: Tensor, counterfactuals: Tensor) -> Path:
    """Persist one finished batch (rows + tensors) atomically; returns the file written."""
    first = int(query_ids.min()) if len(query_ids) else 0
    path = Path(out_dir) / PARTS / f"part-r{rank}-q{first:08d}.pt"
    with explain_write_errors(path, Path(out_dir)):
        atomic_torch_save({"rows": rows, "query_id": query_ids.cpu().long(),
                           "query": queries.cpu(), "counterfactual": counterfactuals.cpu()}, path)
    return path


def _load_part(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a part is only visible complete, so this is outside damage
        raise RuntimeError(f"results part {path} cannot be read ({err}); delete it to recompute "
                           "those queries") from err


def iter_parts(out_dir: Path) -> Iterable[dict]:
    for path in sorted((Path(out_dir) / PARTS).glob("part-*.pt")):
        yield _load_part(path)


def finished_query_ids(out_dir: Path) -> set[int]:
    """Query ids already persisted in ``out_dir`` (what a resumed run skips)."""
    done: set[int] = set()
    for part in iter_parts(out_dir):
        done.update(int(q) for q in part["query_id"])
    return done


def merge_parts(out_dir: Path) -> tuple[list[dict], dict[str, Tensor]]:
    """All persisted queries, one per id, sorted by id: (rows, stacked tensors)."""
    rows: dict[int, dict] = {}
    tensors: dict[int, tuple[Tensor, Tensor]] = {}
    for part in iter_parts(out_dir):
        for row, qid, q, cf in zip(part["rows"], part["query_id"], part["query"], part["counterfactual"]):
            qid = int(qid)
            if qid not in rows:  # first copy wins; a duplicate can only be an identical rerun
                rows[qid] = row
                tensors[qid] = (q, cf)
    ids = sorted(rows)
    stacked: dict[str, Tensor] = {"query_id": torch.tensor(ids, dtype=torch.long)}
    if ids:
        stacked["query"] = torch.stack([tensors[i][0] for i in ids])
        stacked["counterfactual"] = torch.stack([tensors[i][1] for i in ids])
    return [rows[i] for i in ids], stacked


def write_results_table(path: Path, rows: list[dict]) -> None:
    """results.csv: one row per query; columns are the union of row keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    with explain_write_errors(path, Path(path).parent):
        atomic_write_text(path, buf.getvalue())
