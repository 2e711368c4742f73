"""``python -m disc_pl.bench [--quick]`` — how fast and how efficiently counterfactuals are made.

Measures, on one device (CUDA if available, else CPU), with the default run config
(``conf/run.yaml``: synthetic-faces images, manifold=dep, space=lso, ``inversion.precision``)
and each prior's yaml sizes, at each image size of ``--sizes`` (default 32 and 96 px, and 128
px on CUDA; the first size also gets the batched-vs-sequential comparison):

* **throughput**: counterfactuals per second for prior tv / dip / inr at batch sizes 1/8/32/64;
* **batched vs sequential**: 32 INR queries optimised together vs one at a time (same seeds,
  same settings; also checks that both give the same counterfactuals);
* **per-step split**: the real engine step of the ``all`` stage (the most expensive one),
  split by ``torch.profiler`` into its labelled parts (generator, gate, classifier,
  objective terms, backward, optimiser, bookkeeping);
* **FLOP/s**: the FLOPs of one engine step (``torch.utils.flop_counter``) over its measured
  time, as a fraction of a dense 2048x2048 matmul's FLOP/s measured in the same run *in the
  precision the engine runs in* (bf16 under ``bf16-mixed``; float32 also reported);
* **end to end** (``--e2e-queries``, default 32; 0 skips): ``python -m disc_pl.run`` at the
  largest size (``prior.hparams.sigma=10`` from 64 px, as in docs/PERFORMANCE.md) in a child process,
  once to fill the model cache (training, when the cache has no such models), then timed: the
  whole command's wall seconds per counterfactual, and the engine's share (``results.csv``);
* **peak memory** per case and per query: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
  the process's peak resident set (``VmHWM``, reset before each case through
  ``/proc/self/clear_refs``; where that is not possible, ``ru_maxrss``, the peak so far), minus
  the resident set before the case, over the batch size.

Step counts are fixed (no early stopping: ``min_steps > steps``, unreachable PSNR target) so
figures compare across priors and batch sizes. The classifier is a fresh, untrained ResNet-18
(+ DEP head) of the default width unless ``--checkpoint`` names a trained one: the cost of a
step does not depend on the weights. On CUDA, TF32 is enabled for matmuls and cuDNN.

Writes ``bench.json`` and ``bench.md`` to ``outputs/bench/<time>/`` (or ``--out``) and prints
the Markdown and the path.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import csv
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from disc_pl.allocator import check_allocator_mode, retained_heap
from disc_pl.cf import memory, precision as amp
from disc_pl.cf.engine import InversionOptions, Stage, generate_counterfactuals
from disc_pl.cf.losses import DEPManifold
from disc_pl.job import inversion_options
from disc_pl.models.fit import build_model
from disc_pl.models.loading import load_classifier
from disc_pl.utils import CONF_DIR

PRIORS = ("tv", "dip", "inr", "warp")
TARGETS = {"batched_over_sequential": 2.0, "flops_fraction_of_matmul": 0.4}  # the issue's CPU targets


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m disc_pl.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny step counts and batches (a smoke test)")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, every core)")
    p.add_argument("--out", default=None, help="output folder (default outputs/bench/<time>)")
    p.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help="default 1 8 32 64 at the first size, 1 16 at the others")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="image sizes in px (default 32 96, and 128 on CUDA; --quick: 32)")
    p.add_argument("--recon-steps", type=int, default=None, help="reconstruction steps (default 10)")
    p.add_argument("--stage-steps", type=int, default=None, help="steps per counterfactual stage (default 10)")
    p.add_argument("--sequential-queries", type=int, default=None, help="default 32")
    p.add_argument("--checkpoint", default=None, help="a trained classifier (model.ckpt) instead of a fresh one")
    p.add_argument("--e2e-queries", type=int, default=None,
                   help="queries of the end-to-end disc_pl.run at the largest size (default 32, --quick 0; 0: skip)")
    p.add_argument("--cache-dir", default=None,
                   help="model cache of the end-to-end run (default: the run config's, outputs/model_cache)")
    p.add_argument("overrides", nargs="*", help="run-config overrides, e.g. localize=none prior.hparams.hidden=256")
    args = p.parse_args(argv)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        from disc_pl.errors import UsageError

        raise UsageError(f"--checkpoint {args.checkpoint}: no such file; give a model.ckpt written by disc_pl.train "
                         "(or leave --checkpoint out for a fresh classifier)")
    return args


# -- timing helpers ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed2(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(), each the fastest of ``repeats`` calls (device
    synchronised around each): on a shared machine other processes only ever add time. With one
    thread on a CPU, the CPU seconds are what the wall time would be on an idle machine."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def timed(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Fastest wall seconds of fn() over ``repeats`` calls (see timed2)."""
    return timed2(fn, device, repeats)[0]


def matmul_flops(device: torch.device, n: int, repeats: int, dtype: torch.dtype = torch.float32
                 ) -> tuple[float, float]:
    """Dense n x n matmul FLOP per wall second and per CPU second (2 n^3 per product) in
    ``dtype`` on this device and thread count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    timed(lambda: a @ b, device)  # warm-up
    wall, cpu = timed2(lambda: a @ b, device, repeats)
    return 2 * n**3 / wall, 2 * n**3 / max(cpu, 1e-9)


# -- the setup -----------------------------------------------------------------------------------
class Bench:
    """Models, queries and settings shared by every measurement."""

    def __init__(self, args: argparse.Namespace, device: torch.device, size: int | None = None,
                 first: bool = True) -> None:
        self.device = device
        quick = args.quick
        self.recon_steps = args.recon_steps if args.recon_steps is not None else (1 if quick else 10)
        self.stage_steps = args.stage_steps if args.stage_steps is not None else (1 if quick else 10)
        self.batch_sizes = args.batch_sizes or ([1, 2] if quick else ([1, 8, 32, 64] if first else [1, 16]))
        self.split_batch = 2 if quick else 32
        self.sequential_queries = args.sequential_queries or (2 if quick else 32)
        self.timing_repeats = 1 if quick else 5  # per-part step timings (fastest kept)
        self.run_repeats = 1 if quick else 2  # whole generate() runs (fastest kept)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            sized = [f"dataset.image_size={size}"] if size is not None else []
            self.configs = {p: compose("run", overrides=[f"prior={p}", "logger=none", *sized, *args.overrides])
                            for p in args.priors}
        cfg = next(iter(self.configs.values()))
        self.precision = amp.resolve(cfg.inversion.precision, device)
        self.classifier, self.classifier_desc = self._classifier(cfg, args.checkpoint)
        self.manifold = DEPManifold(self.classifier)
        size = int(cfg.dataset.image_size)
        g = torch.Generator().manual_seed(0)
        n = max(max(self.batch_sizes), self.split_batch, self.sequential_queries)
        self.images = torch.rand(n, 3, size, size, generator=g).to(device)
        self.targets = torch.ones(n, dtype=torch.long, device=device)

    def _classifier(self, cfg, checkpoint: str | None):
        if checkpoint:
            model = load_classifier(checkpoint)
            desc = f"trained classifier {checkpoint}"
        else:
            data = SimpleNamespace(num_classes=2, channels=3, image_size=int(cfg.dataset.image_size),
                                   class_names=["not_smiling", "smiling"])
            torch.manual_seed(0)
            model = build_model(cfg.models.classifier, data)
            model.dep_target.fill_(1.0)  # untrained: any finite DEP level
            desc = (f"fresh untrained ResNet-18 (width {model.hparams.width}, conf/model/classifier.yaml) "
                    "+ DEP head")
        model = model.to(self.device).eval().requires_grad_(False)
        return model, desc

    def options(self, prior: str) -> tuple[InversionOptions, Any]:
        """The run config's options for ``prior`` with fixed step counts (no early stopping)."""
        options, factory = inversion_options(self.configs[prior])  # factory: the prior's generators
        stages = [Stage(groups=list(s.groups), steps=self.stage_steps, min_steps=self.stage_steps + 1)
                  for s in options.stages]  # min_steps > steps: a flipped query never leaves
        recon = self.recon_steps if options.recon_steps > 0 else 0  # tv: nothing to reconstruct
        # gate retry, prior fallback, confined search and search elsewhere off: a fixed amount of
        # work per query (no second search; the bench measures each prior by itself)
        gate = replace(options.gate, fallback=False) if options.gate is not None else None
        return replace(options, stages=stages, recon_steps=recon, psnr_target=1e9, log_every=0,
                       gate=gate, precision=self.precision, fallback=None, refine=None,
                       retry_elsewhere=False, retry_hparams=()), factory

    def generate(self, prior: str, rows: slice, options: InversionOptions | None = None, hparams=None):
        """``hparams``: the prior's generator factory (``Bench.options``)."""
        if options is None:
            options, hparams = self.options(prior)
        images, targets = self.images[rows], self.targets[rows]
        seeds = list(range(rows.start or 0, (rows.start or 0) + images.shape[0]))
        return generate_counterfactuals(self.classifier, images, targets, prior=hparams,
                                        manifold=self.manifold, options=options, seeds=seeds)


# -- measurements --------------------------------------------------------------------------------
def throughput(bench: Bench, prior: str, batch: int) -> dict:
    options, hparams = bench.options(prior)
    bench.generate(prior, slice(0, 1), replace(options, recon_steps=min(options.recon_steps, 1),
                                               stages=[replace(s, steps=1) for s in options.stages]), hparams)
    windowed = memory.reset_peak(bench.device)  # first: it may hand kept memory back to the system
    before = memory.current_mb(bench.device)
    out: list = []
    seconds, cpu = timed2(lambda: out.append(bench.generate(prior, slice(0, batch), options, hparams)),
                          bench.device, bench.run_repeats)
    cf_steps = sum(s.steps for s in options.stages)
    if int(out[0].steps.min()) != cf_steps:  # guard: the figures assume fixed step counts
        raise RuntimeError(f"{prior} B={batch}: a query stopped early ({out[0].steps.tolist()})")
    return {"prior": prior, "batch_size": batch, "seconds": seconds, "cf_per_s": batch / seconds,
            "cpu_seconds": cpu, "cf_per_cpu_s": batch / cpu,
            "recon_steps": options.recon_steps, "cf_steps": cf_steps,
            "peak_memory_mb": memory.peak_mb(bench.device),
            # what the case added over what the process held before it, per query
            "memory_per_query_mb": max(memory.peak_mb(bench.device) - before, 0.0) / batch if windowed else None}


def batched_vs_sequential(bench: Bench, prior: str = "inr") -> dict:
    n = bench.sequential_queries
    options, hparams = bench.options(prior)
    bench.generate(prior, slice(0, 1), options, hparams)  # warm-up
    batched: list = []
    t_batched, cpu_batched = timed2(lambda: batched.append(bench.generate(prior, slice(0, n), options, hparams)),
                                    bench.device, bench.run_repeats)
    singles: list = []
    t_seq, cpu_seq = timed2(lambda: singles.extend(bench.generate(prior, slice(i, i + 1), options, hparams)
                                                   for i in range(n)), bench.device, bench.run_repeats)
    seq_images = torch.cat([s.images for s in singles[:n]])
    return {"prior": prior, "queries": n, "batched_s": t_batched, "sequential_s": t_seq,
            "ratio": t_seq / t_batched, "batched_cpu_s": cpu_batched, "sequential_cpu_s": cpu_seq,
            "ratio_cpu": cpu_seq / cpu_batched,
            "max_abs_diff": float((seq_images - batched[0].images).abs().max())}


# The engine's labelled ranges of one step (torch.profiler.record_function in cf/search.py).
STEP_PARTS = ("generator", "gate", "classifier", "objective", "backward", "optimizer", "bookkeeping")


def step_split(bench: Bench, prior: str) -> dict:
    """ms per step in each labelled part of the real engine step (``all`` stage, the gate
    included when the run config has it), from ``torch.profiler`` over n steps of the engine.
    The parts are the host time of each range (on CUDA, kernels run asynchronously: the GPU
    time of a range can differ); ``other`` = the measured step - the parts."""
    n = 2 if bench.stage_steps <= 2 else 10
    rows = slice(0, bench.split_batch)
    options, hp = _single_stage(bench, prior, n)
    bench.generate(prior, rows, options, hp)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        bench.generate(prior, rows, options, hp)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}  # microseconds, n steps
    parts = {name: totals.get(f"disc_pl.{name}", 0.0) / 1e3 / n for name in STEP_PARTS}
    step_s, step_cpu_s = engine_step_seconds(bench, prior)
    step_ms = step_s * 1e3
    parts["other"] = max(step_ms - sum(parts.values()), 0.0)
    return {"prior": prior, "batch_size": bench.split_batch, "stage": "all", "step_ms": step_ms,
            "step_cpu_ms": step_cpu_s * 1e3, "gate": options.gate is not None,
            **{f"{k}_ms": v for k, v in parts.items()},
            **{f"{k}_fraction": v / step_ms for k, v in parts.items()}}


def _single_stage(bench: Bench, prior: str, steps: int) -> tuple[InversionOptions, dict]:
    options, hparams = bench.options(prior)
    return replace(options, recon_steps=0, stages=[Stage(["all"], steps=steps, min_steps=steps + 1)]), hparams


def engine_step_seconds(bench: Bench, prior: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one engine step (``all`` stage): (t(2n steps) - t(n steps)) / n,
    so the setup (generator init, first and last classifier pass) cancels."""
    n = 2 if bench.stage_steps <= 2 else 10
    rows = slice(0, bench.split_batch)
    short, hp = _single_stage(bench, prior, n)
    long, _ = _single_stage(bench, prior, 2 * n)
    bench.generate(prior, rows, short, hp)  # warm-up
    reps = max(bench.timing_repeats // 2, 1)
    t_short = timed2(lambda: bench.generate(prior, rows, short, hp), bench.device, reps)
    t_long = timed2(lambda: bench.generate(prior, rows, long, hp), bench.device, reps)
    return max(t_long[0] - t_short[0], 1e-9) / n, max(t_long[1] - t_short[1], 1e-9) / n


def engine_step_flops(bench: Bench, prior: str) -> int:
    """FLOPs of one engine step (``all`` stage) at the split batch size: F(2 steps) - F(1 step)
    (setup cancels) of ONE query, times the batch size. Queries are independent, so a batch
    does exactly batch x one query's work; counting one query sidesteps FlopCounterMode's
    grouped-convolution weight gradient, which it counts as dense (x batch for DIP's groups=B)."""
    counts = []
    for steps in (1, 2):
        options, hp = _single_stage(bench, prior, steps)
        with FlopCounterMode(display=False) as counter:
            bench.generate(prior, slice(0, 1), options, hp)
        counts.append(counter.get_total_flops())
    return (counts[1] - counts[0]) * bench.split_batch


def flop_rate(bench: Bench, split: dict, matmul: tuple[float, float]) -> dict:
    """The engine step's FLOP/s (per wall and per CPU second) and its fraction of the matmul's."""
    flops = engine_step_flops(bench, split["prior"])
    achieved, achieved_cpu = flops / (split["step_ms"] / 1e3), flops / (split["step_cpu_ms"] / 1e3)
    return {"prior": split["prior"], "batch_size": bench.split_batch, "flops_per_step": flops,
            "step_s": split["step_ms"] / 1e3, "achieved_flops_per_s": achieved,
            "fraction_of_matmul": achieved / matmul[0], "achieved_flops_per_cpu_s": achieved_cpu,
            "fraction_of_matmul_cpu": achieved_cpu / matmul[1]}


def end_to_end(queries: int, size: int, overrides: Sequence[str], out_dir: Path, threads: int | None = None,
               cache_dir: str | None = None, device: torch.device | None = None) -> dict:
    """``python -m disc_pl.run`` with ``queries`` queries of ``size`` px in a child process: a
    first run fills the model cache (it trains what the cache lacks), the second is timed (the
    whole command, start-up included). Seconds per counterfactual: the command's wall time over
    the queries, and the engine's own share (mean of ``results.csv`` ``seconds``)."""
    args = [f"dataset.image_size={size}", f"query.count={queries}", "logger=none", *overrides]
    if size >= 64 and not any(o.startswith("prior.hparams.sigma=") for o in overrides):
        args.insert(1, "prior.hparams.sigma=10")  # the 96 px setting of docs/PERFORMANCE.md
    if threads is not None:
        args.append(f"threads_per_job={threads}")
    if cache_dir is not None:
        args.append(f"cache_dir={cache_dir}")
    if device is not None and device.type == "cuda":
        args.append("trainer=gpu")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    runs: list[float] = []
    for name in ("first", "timed"):
        run_dir = out_dir / f"e2e_{name}"
        cmd = [sys.executable, "-m", "disc_pl.run", *args, f"hydra.run.dir={run_dir}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        runs.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise RuntimeError(f"end-to-end run failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                               f"{proc.stderr[-3000:]}")
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    engine = [float(r["seconds"]) for r in rows]
    return {"command": "python -m disc_pl.run " + " ".join(args), "queries": len(rows), "image_size": size,
            "first_run_s": runs[0], "seconds": runs[1], "seconds_per_cf": runs[1] / max(len(rows), 1),
            "engine_seconds_per_cf": sum(engine) / max(len(engine), 1),
            "flip_rate": sum(r.get("status") == "flipped" for r in rows) / max(len(rows), 1),
            "precision": rows[0].get("precision") if rows else None}


# -- report --------------------------------------------------------------------------------------
def _size_tables(r: dict, z: dict) -> list[str]:
    size = z["image_size"]
    lines = [f"## {size}x{size} px: counterfactuals per second", "",
             "Wall clock, and per CPU second of this process (with 1 thread: the wall time an idle "
             "machine would give); memory: the case's peak over what the process held before it.", "",
             "| prior | batch | seconds | cf/s | CPU s | cf per CPU s | peak MB | MB per query |",
             "|---|---|---|---|---|---|---|---|"]
    for t in z["throughput"]:
        per_query = "n/a" if t.get("memory_per_query_mb") is None else f"{t['memory_per_query_mb']:.1f}"
        lines.append(f"| {t['prior']} | {t['batch_size']} | {t['seconds']:.2f} | {t['cf_per_s']:.2f} | "
                     f"{t['cpu_seconds']:.2f} | {t['cf_per_cpu_s']:.2f} | "
                     f"{t['peak_memory_mb']:.0f} | {per_query} |")
    m = r["matmul"]
    lines += ["", f"## {size}x{size} px: one step of the `all` stage (batch {z['step_split'][0]['batch_size']})", "",
              "The engine's own step (wall and CPU ms, from runs of n and 2n steps), split into its "
              "labelled parts by torch.profiler (host ms per step; forward parts, then the one backward "
              "pass; `objective` includes the manifold model; `other` = step - the parts). FLOPs "
              f"counted with torch.utils.flop_counter; `of matmul`: of the {m['dtype']} matmul's rate.", "",
              "| prior | step ms | step CPU ms | " + " | ".join(STEP_PARTS) + " | other | GFLOP/step "
              "| GFLOP/s | of matmul | of matmul (CPU time) |",
              "|---" * (len(STEP_PARTS) + 8) + "|"]
    for s, f in zip(z["step_split"], z["flops"]):
        share = " | ".join(f"{s[k + '_ms']:.1f} ({100 * s[k + '_fraction']:.0f}%)"
                           for k in (*STEP_PARTS, "other"))
        lines.append(f"| {s['prior']} | {s['step_ms']:.1f} | {s['step_cpu_ms']:.1f} | {share} | "
                     f"{f['flops_per_step'] / 1e9:.2f} | {f['achieved_flops_per_s'] / 1e9:.1f} | "
                     f"{100 * f['fraction_of_matmul']:.0f}% | {100 * f['fraction_of_matmul_cpu']:.0f}% |")
    return lines + [""]


def markdown(r: dict) -> str:
    sizes = ", ".join(f"{z['image_size']}x{z['image_size']}" for z in r["sizes"])
    lines = [f"# disc_pl bench — {r['device_name']} ({r['threads']} threads), {r['time']}", "",
             f"Load average {r['load_average_start']:.1f} at the start, {r['load_average_end']:.1f} at the end "
             f"({r['seconds']:.0f} s); OMP_WAIT_POLICY={r['env']['OMP_WAIT_POLICY']}.", "",
             f"Classifier: {r['classifier']}. Images {sizes}, "
             + ", ".join(f"{k}={v}" for k, v in r["method"].items())
             + (f" (overrides: {' '.join(r['overrides'])})" if r["overrides"] else "")
             + f"; {r['recon_steps']} reconstruction steps, {r['stage_steps']} steps per stage, "
             f"no early stopping. Precision: {r['precision_note']}. "
             f"C allocator: {r.get('cpu_allocator', 'system')}.", ""]
    bs = r["batched_vs_sequential"]
    lines += ["## Batched vs sequential", "",
              f"{bs['queries']} {bs['prior']} queries of {r['image_size']}x{r['image_size']} px: batched "
              f"{bs['batched_s']:.2f} s, one at a time "
              f"{bs['sequential_s']:.2f} s: **{bs['ratio']:.2f}x** (CPU time: {bs['batched_cpu_s']:.2f} s vs "
              f"{bs['sequential_cpu_s']:.2f} s, **{bs['ratio_cpu']:.2f}x**; target >= "
              f"{TARGETS['batched_over_sequential']}x); max |difference| {bs['max_abs_diff']:.1e}", ""]
    for z in r["sizes"]:
        lines += _size_tables(r, z)
    e = r.get("end_to_end")
    if e:
        lines += [f"## End to end: `disc_pl.run` at {e['image_size']}x{e['image_size']} px, {e['queries']} queries", "",
                  f"`{e['command']}`, models cached (the first run, {e['first_run_s']:.0f} s, filled the cache): "
                  f"**{e['seconds_per_cf']:.2f} s per counterfactual** end to end ({e['seconds']:.0f} s, start-up "
                  f"included), of which the engine {e['engine_seconds_per_cf']:.2f} s; precision {e['precision']}, "
                  f"flip rate {e['flip_rate']:.2f} (one classifier: not a quality figure).", ""]
    m = r["matmul"]
    lines += [f"Reference: {m['n']}x{m['n']} {m['dtype']} matmul {m['flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"({m['flops_per_cpu_s'] / 1e9:.1f} per CPU second; float32 {m['float32_flops_per_s'] / 1e9:.1f}) "
              f"(target: INR step at the largest size >= {100 * TARGETS['flops_fraction_of_matmul']:.0f}% of it). "
              f"Peak memory: {r['memory_kind']}.", ""]
    return "\n".join(lines)


def _default_sizes(args: argparse.Namespace, device: torch.device) -> list[int]:
    if args.sizes:
        return list(args.sizes)
    if args.quick:
        return [32]
    return [32, 96, 128] if device.type == "cuda" else [32, 96]


def measure_size(bench: Bench, args: argparse.Namespace, matmul: tuple[float, float]) -> dict:
    """Throughput, per-step split and FLOP rate of every prior at the bench's image size."""
    out: dict[str, Any] = {"image_size": int(bench.images.shape[-1]), "batch_sizes": bench.batch_sizes,
                           "precision": bench.precision}
    out["throughput"] = [throughput(bench, p, b) for p in args.priors for b in bench.batch_sizes]
    out["step_split"] = [step_split(bench, p) for p in args.priors]
    out["flops"] = [flop_rate(bench, s, matmul) for s in out["step_split"]]
    return out


def run_bench(args: argparse.Namespace) -> tuple[dict, Path]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = dt.datetime.now()
    out_dir = Path(args.out or Path("outputs/bench") / started.strftime("%Y-%m-%d_%H-%M-%S"))
    sizes = _default_sizes(args, device)
    bench = Bench(args, device, sizes[0], first=True)
    matmul_n = 256 if args.quick else 2048
    repeats = 2 if args.quick else 5
    fp32 = matmul_flops(device, matmul_n, repeats)
    low = amp.dtype_of(bench.precision)
    # The reference is the matmul in the precision the engine's matmuls run in.
    matmul = matmul_flops(device, matmul_n, repeats, low) if low is not None else fp32
    tf32 = " (TF32)" if device.type == "cuda" else ""
    report: dict[str, Any] = {
        "time": started.isoformat(timespec="seconds"), "quick": bool(args.quick),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "classifier": bench.classifier_desc,
        # Timings on a shared machine: other processes' load, and the OpenMP settings that decide
        # how threads wait (an actively spinning OpenMP barrier on an oversubscribed CPU is slow).
        "load_average_start": os.getloadavg()[0],
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "image_size": int(bench.images.shape[-1]), "image_sizes": sizes, "recon_steps": bench.recon_steps,
        "stage_steps": bench.stage_steps, "batch_sizes": bench.batch_sizes,
        # the bench always uses manifold=dep and space=lso; the gate follows the run config
        "method": {"manifold": "dep", "space": "lso",
                   "localize": str(next(iter(bench.configs.values())).localize.name)},
        "overrides": list(args.overrides),
        "precision": bench.precision,
        "cpu_allocator": getattr(args, "allocator_note", "system"),
        "precision_note": (f"inversion.precision={bench.precision}"
                           + (" (bf16 autocast)" if bench.precision == "bf16-mixed" else "")
                           + (" (fp16 autocast)" if bench.precision == "16-mixed" else "")
                           + (", TF32 for float32 matmul and cuDNN" if device.type == "cuda" else "")),
        "memory_kind": ("torch.cuda.max_memory_allocated per case" if device.type == "cuda"
                        else "peak resident set per case (VmHWM, reset per case)"),
        "matmul": {"n": matmul_n, "dtype": (str(low).replace("torch.", "") if low is not None else "float32" + tf32),
                   "flops_per_s": matmul[0], "flops_per_cpu_s": matmul[1],
                   "float32_flops_per_s": fp32[0], "float32_flops_per_cpu_s": fp32[1]},
        "targets": dict(TARGETS),
    }
    first = measure_size(bench, args, matmul)
    seq_prior = "inr" if "inr" in args.priors else args.priors[0]
    report["batched_vs_sequential"] = batched_vs_sequential(bench, seq_prior)
    report["sizes"] = [first] + [measure_size(Bench(args, device, size, first=False), args, matmul)
                                 for size in sizes[1:]]
    # the first size's tables at the top level (as before --sizes)
    report.update(throughput=first["throughput"], step_split=first["step_split"], flops=first["flops"])
    report["peak_memory_mb"] = memory.peak_mb(device)
    e2e = args.e2e_queries if args.e2e_queries is not None else (0 if args.quick else 32)
    if e2e > 0:
        report["end_to_end"] = end_to_end(e2e, sizes[-1], args.overrides, out_dir, args.threads,
                                          args.cache_dir, device)
    last = report["sizes"][-1]  # the largest size: where the target matters
    inr = next((f for f in last["flops"] if f["prior"] == seq_prior), last["flops"][0])
    bs = report["batched_vs_sequential"]
    report["targets_met"] = {  # wall clock, and CPU time (what an idle machine gives, with 1 thread)
        "batched_over_sequential": bs["ratio"] >= TARGETS["batched_over_sequential"],
        "flops_fraction_of_matmul": inr["fraction_of_matmul"] >= TARGETS["flops_fraction_of_matmul"],
        "batched_over_sequential_cpu": bs["ratio_cpu"] >= TARGETS["batched_over_sequential"],
        "flops_fraction_of_matmul_cpu": inr["fraction_of_matmul_cpu"] >= TARGETS["flops_fraction_of_matmul"],
    }
    report["seconds"] = (dt.datetime.now() - started).total_seconds()
    report["load_average_end"] = os.getloadavg()[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench.md").write_text(markdown(report))
    return report, out_dir


def _allocator_mode(overrides: Sequence[str]) -> str:
    """``cpu_allocator`` from the run-config overrides (the run config's default: retain)."""
    modes = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith("cpu_allocator=")]
    return check_allocator_mode(modes[-1] if modes else "retain")


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    mode = _allocator_mode(args.overrides)
    with retained_heap(mode) as kept:  # as in a job (disc_pl.tracking.tracked_job)
        args.allocator_note = f"cpu_allocator={mode}" + ("" if kept or mode == "system" else " (not active here)")
        report, out_dir = run_bench(args)
    print(markdown(report))
    print(f"bench written to {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    return report


if __name__ == "__main__":
    from disc_pl import cli

    cli.guard(main)  # a user error: its message and exit status 2
