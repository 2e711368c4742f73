"""Hardening, runtime: faults during generation lose nothing. A diverging or unflippable query
is reported, not fatal; out of GPU memory, a batch is split; SIGTERM / SIGKILL / a full disk
leave every finished batch intact and a rerun completes the job; same seed, same results."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from disc_pl import run as run_lib
from disc_pl.cf import module as module_lib
from disc_pl.cf import results as results_lib
from disc_pl.cf.module import query_seed
from disc_pl.errors import ResultsWriteError
from disc_pl.models.cache import ensure_model, load_classifier
from disc_pl.models.fit import train_model

from conftest import FAST_TV, TEST_SEED, TOY_MODEL, compose_cfg
from hardening_support import entries, load_part, read_rows, subprocess_env, without_timing

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models on one thread


@pytest.fixture(scope="module")
def toy_cfg(toy_overrides):
    """Overrides of a cheap run whose classifier is trained (once) into the shared cache."""
    overrides = list(toy_overrides)
    cfg = compose_cfg(overrides)
    path = ensure_model(cfg.models.classifier, cfg.dataset, cfg.trainer, cfg.seed, cfg.cache_dir,
                        train_fn=train_model)
    return overrides, path


def run_into(out_dir: Path, overrides: list[str], *extra: str) -> dict:
    return run_lib.run(compose_cfg([*overrides, *extra]), out_dir=out_dir)


def part_files(out_dir: Path) -> list[Path]:
    return sorted((out_dir / "parts").glob("part-*.pt"))


def part_ids(out_dir: Path) -> list[int]:
    return [int(q) for p in part_files(out_dir) for q in load_part(p)["query_id"]]


# --------------------------------------------------------------------------- per-query faults
@pytest.mark.slow
def test_non_finite_loss_in_one_query_is_isolated(tmp_path, toy_cfg, monkeypatch):
    overrides, _ = toy_cfg
    real = module_lib.QueryDataset.__getitem__
    poisoned: list[int] = []

    def getitem(self, i):
        item = real(self, i)
        if i == 1:  # the second query gets NaN pixels: its loss is NaN from the first step
            item["image"] = item["image"].clone()
            item["image"][:, 4:8, 4:8] = float("nan")
            poisoned.append(item["query_id"])
        return item

    monkeypatch.setattr(module_lib.QueryDataset, "__getitem__", getitem)
    metrics = run_into(tmp_path, overrides)
    rows = read_rows(tmp_path)
    assert len(rows) == 6 and len(poisoned) == 1
    status = {int(r["query_id"]): r["status"] for r in rows}
    assert status.pop(poisoned[0]) == "diverged"
    assert set(status.values()) <= {"flipped", "not_flipped"}  # the rest of its batch went on
    assert metrics["cf/n_diverged"] == 1 and metrics["cf/queries"] == 6


@pytest.mark.slow
def test_query_that_never_flips_keeps_its_best_attempt(tmp_path, toy_cfg):
    overrides, model_path = toy_cfg
    metrics = run_into(tmp_path, overrides, "inversion.target_margin=0.99", "inversion.steps_per_stage=3",
                       "prior.lr=1e-4")
    rows = read_rows(tmp_path)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"not_flipped"}
    assert {r["flipped"] for r in rows} == {"False"} and metrics["cf/flip_rate"] == 0.0
    saved = torch.load(tmp_path / "counterfactuals.pt", weights_only=True)
    assert torch.isfinite(saved["counterfactual"]).all()
    # the kept image is reported honestly: its target probability is what the classifier says
    with torch.no_grad():
        p = torch.softmax(load_classifier(model_path)(saved["counterfactual"]), 1)[:, 1]
    torch.testing.assert_close(p, torch.tensor([float(r["target_prob"]) for r in rows]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- out of GPU memory
@pytest.mark.slow
def test_out_of_memory_splits_the_batch_and_gives_the_unsplit_results(tmp_path, toy_cfg, monkeypatch, caplog):
    """6 queries in batches of 4 + 2 on a GPU that holds 2: the 4 are retried as 2 + 2. The
    reference is the run that never ran out of memory with those same groups of queries
    (query.batch_size=2): bit-identical. (Against batches of 4 the results agree only up to the
    round-off of batch-size dependent CPU kernels, which Adam can amplify on flat pixels.)"""
    overrides, _ = toy_cfg
    unsplit = run_into(tmp_path / "unsplit", overrides, "query.batch_size=2")

    real = module_lib.generate_counterfactuals
    attempts: list[int] = []
    done_seeds: list[int] = []

    def small_gpu(classifier, images, targets, **kw):
        attempts.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        done_seeds.extend(kw["seeds"])
        return real(classifier, images, targets, **kw)

    monkeypatch.setattr(module_lib, "generate_counterfactuals", small_gpu)
    split = run_into(tmp_path / "split", overrides, "query.batch_size=4", "query.memory_fraction=null")
    assert attempts == [4, 2, 2, 2]  # the batch of 4 failed once and ran as 2 + 2
    ids = [int(r["query_id"]) for r in read_rows(tmp_path / "split")]
    assert len(ids) == 6 and sorted(done_seeds) == sorted(query_seed(TEST_SEED, q) for q in ids)  # each once
    assert without_timing(read_rows(tmp_path / "split")) == without_timing(read_rows(tmp_path / "unsplit"))
    a = torch.load(tmp_path / "split" / "counterfactuals.pt", weights_only=True)
    b = torch.load(tmp_path / "unsplit" / "counterfactuals.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert split["cf/flip_rate"] == unsplit["cf/flip_rate"]
    assert "Next time set query.batch_size=2" in caplog.text


@pytest.mark.slow
def test_first_batch_guess_runs_what_fits_in_memory_and_gives_the_smaller_batch_results(
        tmp_path, toy_cfg, monkeypatch, caplog):
    """A probe of the first batch measures the memory per query (here: 50 MB, as if measured);
    with 125 MB free and query.memory_fraction=0.8, 2 queries fit: batches of 4 run as 2 + 2,
    bit-identical to query.batch_size=2, with a warning naming the batch size to set."""
    overrides, _ = toy_cfg
    unsplit = run_into(tmp_path / "unsplit", overrides, "query.batch_size=2", "query.memory_fraction=null")
    real = module_lib.generate_counterfactuals
    sizes: list[int] = []

    def counting(classifier, images, targets, **kw):
        sizes.append(len(images))
        return real(classifier, images, targets, **kw)

    monkeypatch.setattr(module_lib, "generate_counterfactuals", counting)
    monkeypatch.setattr(module_lib, "available_mb", lambda device: 125.0)
    probes: list[int] = []

    def measured(fn, device):
        probes.append(1)
        fn()
        return 100.0  # the probe's 2 queries

    monkeypatch.setattr(module_lib, "measure_mb", measured)
    split = run_into(tmp_path / "split", overrides, "query.batch_size=4", "query.memory_fraction=0.8")
    assert probes == [1] and sizes == [2, 2, 2, 2]  # one probe (2 queries), then 6 queries as 2 + 2 + 2
    assert without_timing(read_rows(tmp_path / "split")) == without_timing(read_rows(tmp_path / "unsplit"))
    a = torch.load(tmp_path / "split" / "counterfactuals.pt", weights_only=True)
    b = torch.load(tmp_path / "unsplit" / "counterfactuals.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert split["cf/flip_rate"] == unsplit["cf/flip_rate"]
    assert "optimising 2 queries at a time" in caplog.text and "Set query.batch_size=2" in caplog.text


def test_memory_probe_sees_what_a_call_allocates():
    """disc_pl.cf.memory.measure_mb: a call that holds a 64 MB tensor adds >= 60 MB of peak (on a
    Linux CPU through VmHWM), and the global RNG is as before the probe."""
    from disc_pl.cf import memory

    device = torch.device("cpu")
    if not memory.reset_peak(device):
        pytest.skip("this kernel does not let a process reset its peak resident set (/proc/self/clear_refs); "
                    "test_a_peak_reset_that_does_not_take_is_not_a_window covers the refusal")
    state = torch.random.get_rng_state()

    def hold():
        x = torch.rand(16 * 2**20)  # 64 MB, touched
        return float(x.sum())

    used = memory.measure_mb(hold, device)
    assert used is not None and used >= 60, used
    assert torch.equal(torch.random.get_rng_state(), state)
    assert memory.queries_that_fit(50.0, 125.0, 0.8) == 2 and memory.queries_that_fit(500.0, 125.0, 0.8) == 1


def test_a_peak_reset_that_does_not_take_is_not_a_window(monkeypatch, tmp_path):
    """Kernels or sandboxes that accept the write to clear_refs but keep the old VmHWM, or whose
    VmHWM does not follow allocations: reset_peak reports False and measure_mb gives None (the
    memory probe then warns instead of guessing from a wrong figure)."""
    from disc_pl.cf import memory

    status = tmp_path / "status"
    real_path = memory.Path

    def fake_path(p):
        if p == "/proc/self/clear_refs":
            return tmp_path / "clear_refs"  # the write succeeds
        return status if p == "/proc/self/status" else real_path(p)

    def proc(hwm_kb, rss_kb):
        status.write_text(f"Name:\tpython\nVmHWM:\t {hwm_kb} kB\nVmRSS:\t {rss_kb} kB\n")

    monkeypatch.setattr(memory, "Path", fake_path)
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "_cpu_window", None)
    proc(900000, 300000)  # the old peak stays
    assert memory.reset_peak(cpu) is False and memory.measure_mb(lambda: None, cpu) is None
    monkeypatch.setattr(memory, "_cpu_window", None)
    proc(300512, 300000)  # the reset takes, but the peak never moves (the calibration block unseen)
    assert memory.reset_peak(cpu) is False
    monkeypatch.setattr(memory, "_cpu_window", True)  # a working window
    assert memory.reset_peak(cpu) is True
    proc(900000, 300000)
    assert memory.reset_peak(cpu) is False  # ... and every reset is still checked


_HEAP_SCRIPT = """
import json, resource, torch
from disc_pl import allocator
from disc_pl.cf import memory

def faults_of_reuse():  # minor page faults of 6 allocate-touch-free cycles of 64 MB, after a first
    x = torch.ones(16 * 2**20); del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        x = torch.ones(16 * 2**20); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

plain = faults_of_reuse()
with allocator.retained_heap("system") as system_kept:
    system = faults_of_reuse()
with allocator.retained_heap("retain") as kept:
    with allocator.retained_heap("retain") as inner:  # a job inside a job
        pass
    retained = faults_of_reuse()  # after the inner block ended: still kept
    window = memory.reset_peak(torch.device("cpu"))
    probe = memory.measure_mb(lambda: float(torch.rand(16 * 2**20).sum()), torch.device("cpu"))
after = faults_of_reuse()
print(json.dumps(dict(plain=plain, system=system, system_kept=system_kept, kept=kept, inner=inner,
                      retained=retained, window=window, probe=probe, after=after)))
"""


def test_retained_heap_reuses_freed_memory_and_restores_the_defaults():
    """cpu_allocator=retain (disc_pl.allocator.retained_heap): glibc keeps a freed 64 MB tensor's
    memory, so allocating it again costs no page faults; nested blocks keep the tuning until the
    outermost ends; afterwards every cycle faults again (the defaults are back); the memory
    probe still sees a new allocation inside the block (the kept memory is released first).
    In a subprocess: the tuning is process-wide."""
    from disc_pl import allocator

    if allocator._glibc() is None:
        pytest.skip("the C library is not glibc: retained_heap leaves the allocator alone")
    proc = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**subprocess_env(), "LD_PRELOAD": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if r["plain"] < 6 * 1000:
        pytest.skip(f"this kernel maps 64 MB with few page faults ({r['plain']}; huge pages): nothing to compare")
    assert r["kept"] is True and r["inner"] is True and r["system_kept"] is False
    # reused without the kernel (a small allocation landing in the freed block can force one
    # fresh block, as it would between two engine steps; after that the heap is reused)
    assert r["retained"] <= r["plain"] / 3, r
    assert r["system"] > r["plain"] / 2 and r["after"] > r["plain"] / 2, r  # defaults: fresh pages each time
    if r["window"]:
        assert r["probe"] is not None and r["probe"] >= 60, r
    with pytest.raises(ValueError, match="cpu_allocator='tcmalloc' is not one of retain, system"):
        with allocator.retained_heap("tcmalloc"):
            pass


@pytest.mark.slow
def test_out_of_memory_with_one_query_says_what_to_change(tmp_path, toy_cfg, monkeypatch):
    overrides, _ = toy_cfg

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(module_lib, "generate_counterfactuals", no_memory)
    with pytest.raises(torch.OutOfMemoryError) as info:
        run_into(tmp_path, overrides, "query.count=2", "query.batch_size=2")
    msg = str(info.value)
    assert "out of GPU memory with a single query (3x32x32 image, prior=tv)" in msg
    assert "query.batch_size=1 does not fit either" in msg
    assert part_files(tmp_path) == []


# --------------------------------------------------------------------------- kills
def wait_for_parts(out_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(part_files(out_dir)) < n:
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {n} part(s) were written"
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.02)


@contextmanager
def running(cmd: list[str], stdout) -> Iterator[subprocess.Popen]:
    """A child process that is killed (by its pid) if the test fails while it runs."""
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.STDOUT, env=subprocess_env())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sigterm_and_sigkill_during_generation_lose_nothing(tmp_path, toy_cfg):
    overrides, _ = toy_cfg
    # 6 batches of one query, each a fixed 36 steps (no early stop), so the run is mid-way
    # when the first part appears.
    slow = [*overrides, "query.count=6", "query.batch_size=1", "inversion.min_steps=12"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "disc_pl.run", *slow, f"hydra.run.dir={out}"]

    log_file = tmp_path / "first.log"
    with log_file.open("w") as log, running(cmd, log) as proc:
        wait_for_parts(out, 1, proc)
        first = part_files(out)[0]
        first_rows, first_digest = load_part(first)["rows"], digest(first)
        seen = len(part_ids(out))  # parts on disk when the signal is sent (a state, not a time)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    text = log_file.read_text()
    assert proc.returncode == 143, text[-2000:]  # 128 + SIGTERM: not mistaken for a success
    assert "SIGTERM received: stopping after" in text and f"rerun into {out} to resume" in text
    after_term = part_ids(out)
    # the batch in flight (at most one per process) was finished, then the run stopped early
    assert seen <= len(after_term) < 6 and len(set(after_term)) == len(after_term)

    with running(cmd, subprocess.DEVNULL) as proc:
        wait_for_parts(out, len(after_term) + 1, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # what a SIGKILL during a write leaves behind: a temp file, never read as a part
    stale = out / "parts" / ".part-r0-q00000999.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a part")

    metrics = run_lib.run(compose_cfg(slow), out_dir=out)
    ids = part_ids(out)
    assert len(ids) == 6 and len(set(ids)) == 6  # every query exactly once
    assert metrics["cf/queries"] == 6 and sorted(int(r["query_id"]) for r in read_rows(out)) == sorted(ids)
    assert not stale.exists() and not list((out / "parts").glob("*.tmp"))
    assert digest(first) == first_digest  # the first part was never rewritten
    merged = {int(r["query_id"]): r for r in read_rows(out)}
    for row in first_rows:
        assert merged[row["query_id"]]["status"] == row["status"]
        assert math.isclose(float(merged[row["query_id"]]["target_prob"]), row["target_prob"], rel_tol=1e-6)


# --------------------------------------------------------------------------- disk full / unwritable
@pytest.mark.slow
def test_disk_full_after_the_first_part_names_the_directory_and_keeps_the_parts(tmp_path, toy_cfg, monkeypatch):
    overrides, _ = toy_cfg
    real = results_lib.atomic_torch_save
    saved: list[Path] = []

    def fills_up(obj, path):
        if saved:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, path)
        saved.append(Path(path))

    monkeypatch.setattr(results_lib, "atomic_torch_save", fills_up)
    with pytest.raises(ResultsWriteError) as info:
        run_into(tmp_path, overrides)
    err = info.value
    assert err.errno == errno.ENOSPC
    assert f"cannot write {tmp_path / 'parts'}/part-r0-q" in str(err) and "No space left on device" in str(err)
    assert f"check free space and write permission of {tmp_path / 'parts'}" in str(err)
    assert f"rerun into the same directory (hydra.run.dir={tmp_path}) to resume" in str(err)
    assert part_files(tmp_path) == saved and len(load_part(saved[0])["rows"]) == 2  # intact, loadable
    assert not (tmp_path / "results.csv").exists()

    monkeypatch.setattr(results_lib, "atomic_torch_save", real)
    run_into(tmp_path, overrides)
    assert sorted(part_ids(tmp_path)) == sorted(int(r["query_id"]) for r in read_rows(tmp_path))
    assert len(read_rows(tmp_path)) == 6


def test_output_directory_that_cannot_be_written_fails_before_any_work(tmp_path):
    cache = tmp_path / "cache"
    overrides = [*TOY_MODEL, *FAST_TV, f"cache_dir={cache}"]
    not_a_dir = tmp_path / "results.txt"
    not_a_dir.write_text("a file where the output directory should be")
    with pytest.raises(ResultsWriteError) as info:
        run_into(not_a_dir, overrides)
    assert f"the output directory {not_a_dir} cannot be written (" in str(info.value)
    assert "choose another with hydra.run.dir=..." in str(info.value)
    assert entries(cache) == []


def test_read_only_output_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the disk-full test covers this path)")
        cache = tmp_path / "cache"
        with pytest.raises(ResultsWriteError, match=f"the output directory {out} cannot be written"):
            run_into(out, [*TOY_MODEL, *FAST_TV, f"cache_dir={cache}"])
        assert entries(cache) == []
    finally:
        out.chmod(0o755)


# --------------------------------------------------------------------------- determinism
@pytest.mark.slow
def test_same_config_and_seed_give_identical_results(tmp_path, toy_cfg):
    overrides, _ = toy_cfg
    inr = ["prior=inr", "prior.hparams.hidden=32", "prior.hparams.n_frequencies=32", "prior.hparams.depth=2",
           "prior.stages=[[out],[hidden1,out],[all]]", "prior.recon.max_steps=20", "prior.lr=3e-3",
           "inversion.steps_per_stage=8", "query.count=4", "query.batch_size=2"]
    a = run_into(tmp_path / "a", overrides, *inr)
    b = run_into(tmp_path / "b", overrides, *inr)
    assert without_timing(read_rows(tmp_path / "a")) == without_timing(read_rows(tmp_path / "b"))
    ta = torch.load(tmp_path / "a" / "counterfactuals.pt", weights_only=True)
    tb = torch.load(tmp_path / "b" / "counterfactuals.pt", weights_only=True)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    timing = {k for k in a if k.startswith("cf/seconds")}
    assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()).keys() == \
        json.loads((tmp_path / "b" / "metrics.json").read_text()).keys()


# --------------------------------------------------------------------------- SIGTERM while training
@pytest.mark.slow
def test_sigterm_while_training_a_model_exits_143_and_caches_nothing(tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "disc_pl.run", *TOY_MODEL, "models.classifier.fit.trainer.max_epochs=200",
           f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}"]
    log_file = tmp_path / "train.log"
    with log_file.open("w") as log, running(cmd, log) as proc:
        deadline = time.monotonic() + 300
        while not list(cache.glob(".tmp-classifier-*/**/*.ckpt")):  # a first epoch is checkpointed
            assert proc.poll() is None, log_file.read_text()[-2000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    text = log_file.read_text()
    assert proc.returncode == 143, text[-2000:]  # not mistaken for a success
    assert "SIGTERM received" in text
    assert entries(cache) == [], "a half-trained model was published to the cache"
    assert not list(cache.glob(".tmp-*")), "the half-trained model's temp folder was left behind"
