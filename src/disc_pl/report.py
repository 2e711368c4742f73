"""``python -m disc_pl.report <multirun dir>`` — the paper's Table 1 from a sweep's job dirs.

Every job directory below the given one (a directory with ``metrics.json`` and
``.hydra/config.yaml``, as ``disc_pl.run`` / ``disc_pl.evaluate`` write them) is one job. Jobs
are grouped into *methods* named like the paper ("LSO+INR+DEP"; "LSO+TV+L2" for the TV prior),
extended with the query corruption ("LSO+INR+DEP jpeg@3") and with any other override that
differs between jobs, except ``seed`` (jobs that differ only in seed are pooled).

Per method (mean ± population std):
- MSE, Conc., in-mask: over the flipped queries of the method's jobs (rows of their ``results.csv``;
  for one job these are exactly its ``cf/mse``, ``cf/mse_std``, ... of ``metrics.json``);
- flip rate: fraction of queries flipped (a proportion, no std);
- CD: over seeds (``cd/per_seed`` of the jobs' metrics.json; one job: its ``cd/mean``, ``cd/std``);
  the reference CDs (ground-truth counterfactuals, identity) go to the CSV and under the table.

Writes into ``--out`` (default: the multirun dir): ``report.md``, ``report.csv``, ``report.html``
(a static page: sortable method table, every method's counterfactuals side by side per query,
filters by status; see :mod:`disc_pl.report_html`),
``report_grid.png`` (the same queries, one column pair counterfactual | change per method) and
``report_scatter.png`` (MSE vs concentration, one colour per method). ``--wandb`` also logs the
table and figures to a W&B run (offline unless ``--wandb-mode online``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from disc_pl.errors import UsageError
from disc_pl.figures import save_method_grid, save_scatter
from disc_pl.metrics.shortcut import KEYS as CUE_FIGURES
from disc_pl.report_html import change_split, write_html

PRIOR_NAMES = {"tv": "TV+L2", "dip": "DIP", "inr": "INR", "warp": "Warp"}
# Sort order of the table rows: the paper's (ISO before LSO, weak prior first, DEP last).
ORDER = {"space": ["iso", "lso"], "prior": ["tv", "dip", "inr", "warp"], "manifold": ["none", "duq", "dep"]}
NAMED_KEYS = {"prior", "prior.fallback", "prior@prior.fallback", "manifold", "space", "seed", "query.corruption.name",
              "query.corruption.severity"}
QUERY_FIGURES = ("mse", "concentration", "in_mask", "cout", "gt_recovery", *CUE_FIGURES)
COLUMNS = [  # (header, key in the method's stats)
    ("MSE", "mse"), ("Conc.", "concentration"), ("CD", "cd"), ("flip rate", "flip_rate"),
    ("in-mask", "in_mask"), ("localized", "localized"), ("judge", "judge_flip_rate"), ("COUT", "cout"),
    ("GT rec.", "gt_recovery"),
]
# Reference rows (disc_pl.validity, written by disc_pl.evaluate): metrics prefix -> row name
REFERENCES = {"reference/pgd/": "reference: targeted PGD (pixels, no prior)",
              "reference/pgd_surrogates/": "reference: targeted PGD on the classifier + surrogates",
              "reference/pgd_robust/": "reference: targeted L2 PGD on the robust models alone",
              "reference/gt/": "reference: ground-truth counterfactual"}


@dataclass
class Job:
    path: Path
    cfg: DictConfig
    overrides: list[str]
    metrics: dict[str, Any]
    rows: list[dict[str, str]]


@dataclass
class Method:
    name: str
    sort_key: tuple
    jobs: list[Job] = field(default_factory=list)


# ----------------------------------------------------------------------------- reading
def find_jobs(root: Path) -> list[Job]:
    """Every job dir at or below ``root`` (sorted by path); the CD sub-runs (``cd/``) have no
    ``.hydra`` dir and are not jobs."""
    jobs = []
    for metrics_file in sorted(Path(root).rglob("metrics.json")):
        job_dir = metrics_file.parent
        hydra_dir = job_dir / ".hydra"
        if not (hydra_dir / "config.yaml").exists():
            continue
        cfg = OmegaConf.load(hydra_dir / "config.yaml")
        overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml")) if (hydra_dir / "overrides.yaml").exists() else []
        results = job_dir / "results.csv"
        rows = list(csv.DictReader(results.open())) if results.exists() else []
        jobs.append(Job(job_dir, cfg, [str(o) for o in overrides], json.loads(metrics_file.read_text()), rows))
    if not jobs:
        what = ("does not exist" if not Path(root).exists()
                else "holds no job directory (metrics.json + .hydra/config.yaml)")
        raise UsageError(f"{root} {what}: give a multirun directory written by disc_pl.run / disc_pl.evaluate -m, "
                         "or one job directory")
    return jobs


def _select(cfg: DictConfig, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return default if value is None else value


def method_key(job: Job, varying: Sequence[str]) -> tuple[str, tuple]:
    """The paper-style name of a job's method and its sort key."""
    space = str(_select(job.cfg, "space.name", "lso"))
    prior = str(_select(job.cfg, "prior.name", "?"))
    manifold = str(_select(job.cfg, "manifold.name", "none"))
    name = f"{space.upper()}+{PRIOR_NAMES.get(prior, prior.upper())}"
    fallback = _select(job.cfg, "prior.fallback")
    if isinstance(fallback, DictConfig):  # a composed prior config (a name in runs made before)
        fallback = fallback.get("name")
    if fallback is not None:  # prior.fallback: "Warp/INR" = the warp, the INR for what it cannot flip
        name += f"/{PRIOR_NAMES.get(str(fallback), str(fallback).upper())}"
    if manifold != "none":
        name += f"+{manifold.upper()}"
    corruption = _select(job.cfg, "query.corruption.name")
    severity = int(_select(job.cfg, "query.corruption.severity", 0))
    if corruption is not None and severity > 0:
        name += f" {corruption}@{severity}"
    else:
        corruption, severity = "", 0
    extra = [o for o in job.overrides if o.split("=", 1)[0].lstrip("+~") in varying]
    if extra:
        name += " [" + ", ".join(extra) + "]"

    def rank(group: str, value: str) -> int:
        return ORDER[group].index(value) if value in ORDER[group] else len(ORDER[group])

    key = (rank("space", space), rank("prior", prior), rank("manifold", manifold), corruption, severity,
           tuple(extra))
    return name, key


def varying_overrides(jobs: Sequence[Job]) -> list[str]:
    """Override keys (other than the named ones) whose value differs between jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for o in job.overrides:
            key, _, value = o.partition("=")
            values.setdefault(key.lstrip("+~"), set()).add(value)
    counts = {k: sum(any(o.partition("=")[0].lstrip("+~") == k for o in j.overrides) for j in jobs) for k in values}
    return sorted(k for k, v in values.items()
                  if k not in NAMED_KEYS and not k.startswith("hydra.") and (len(v) > 1 or counts[k] < len(jobs)))


def group_methods(jobs: Sequence[Job]) -> list[Method]:
    varying = varying_overrides(jobs)
    methods: dict[str, Method] = {}
    for job in jobs:
        name, key = method_key(job, varying)
        methods.setdefault(name, Method(name, key)).jobs.append(job)
    return sorted(methods.values(), key=lambda m: (m.sort_key, m.name))


# ----------------------------------------------------------------------------- statistics
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.pstdev(values)


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def method_stats(method: Method) -> dict[str, Any]:
    """``{figure: (mean, std)}`` for the table, plus counts and the reference CDs."""
    rows = [r for job in method.jobs for r in job.rows]
    stats: dict[str, Any] = {"method": method.name, "jobs": len(method.jobs), "queries": len(rows)}
    flipped_rows = [r for r in rows if r.get("flipped") == "True"]  # as cf/* in metrics.json
    for key in QUERY_FIGURES:
        stats[key] = _mean_std([v for r in flipped_rows if not math.isnan(v := _float(r.get(key)))])
    stats["flip_rate"] = (sum(r.get("flipped") == "True" for r in rows) / len(rows), math.nan) if rows \
        else (math.nan, math.nan)
    # share of the flipped counterfactuals found by the gated search (localize=gate; not the fallback)
    flipped = [r for r in rows if r.get("flipped") == "True" and r.get("localized") in ("True", "False")]
    stats["localized"] = (sum(r["localized"] == "True" for r in flipped) / len(flipped), math.nan) if flipped \
        else (math.nan, math.nan)
    for prefix, name in (("cd/", "cd"), ("cd/gt_", "cd_gt"), ("cd/identity_", "cd_identity")):
        with_cd = [j.metrics for j in method.jobs if j.metrics.get(f"{prefix}mean") is not None]
        if len(with_cd) == 1:
            stats[name] = (float(with_cd[0][f"{prefix}mean"]), float(with_cd[0][f"{prefix}std"]))
        elif with_cd and prefix == "cd/" and all("cd/per_seed" in m for m in with_cd):
            stats[name] = _mean_std([float(v) for m in with_cd for v in m["cd/per_seed"]])
        elif with_cd:  # pooled references: the mean of the jobs' means, their spread
            stats[name] = _mean_std([float(m[f"{prefix}mean"]) for m in with_cd])
        else:
            stats[name] = (math.nan, math.nan)
    for key in ("cd/acc_real", "cd/acc_cf"):
        vals = [float(j.metrics[key]) for j in method.jobs if j.metrics.get(key) is not None]
        stats[key.replace("/", "_")] = statistics.fmean(vals) if vals else math.nan
    stats["judge_flip_rate"] = judge_stat([j.metrics for j in method.jobs], "cf/")
    return stats


def judge_stat(metrics: Sequence[dict[str, Any]], prefix: str) -> tuple[float, float]:
    """Judge agreement: one job -> (mean, std across its judges); several jobs (classifier
    seeds) -> (mean, std) of the jobs' figures, i.e. the spread across classifier instances."""
    vals = [m for m in metrics if m.get(f"{prefix}judge_flip_rate") is not None]
    if len(vals) == 1:
        return float(vals[0][f"{prefix}judge_flip_rate"]), float(vals[0].get(f"{prefix}judge_flip_rate_std", math.nan))
    return _mean_std([float(m[f"{prefix}judge_flip_rate"]) for m in vals])


def reference_stats(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One row per reference found in the jobs' metrics: mean ± std over the jobs (std
    across judges for a single job's judge figure)."""
    out = []
    for prefix, name in REFERENCES.items():
        found = [j.metrics for j in jobs if f"{prefix}flip_rate" in j.metrics]
        if not found:
            continue
        row: dict[str, Any] = {"method": name, "jobs": len(found),
                               "queries": sum(int(m.get("cf/queries", 0)) for m in found)}
        for key in [k for _, k in COLUMNS] + [k for k in CUE_FIGURES if f"{prefix}{k}" in found[0]]:
            vals = [float(m[f"{prefix}{key}"]) for m in found if m.get(f"{prefix}{key}") is not None]
            row[key] = (_mean_std(vals) if len(vals) > 1 else (vals[0], float(found[0].get(f"{prefix}{key}_std", math.nan)))
                        if vals else (math.nan, math.nan))
            if key == "flip_rate" and len(vals) == 1:
                row[key] = (vals[0], math.nan)
        row["judge_flip_rate"] = judge_stat(found, prefix)
        for key in ("cd_gt", "cd_identity"):
            row[key] = (math.nan, math.nan)
        row["cd_acc_real"] = row["cd_acc_cf"] = math.nan
        out.append(row)
    return out


def environment(jobs: Sequence[Job]) -> list[str]:
    """The CPU models the jobs ran on (``env/cpu``), sorted."""
    return sorted({str(j.metrics["env/cpu"]) for j in jobs if j.metrics.get("env/cpu")})


# ----------------------------------------------------------------------------- writing
def fmt(mean: float, std: float | None = None) -> str:
    """``0.123 ± 0.0456`` (3 significant digits); ``–`` for a missing value."""
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {std:.3g}"


def markdown_table(stats: Sequence[dict[str, Any]]) -> str:
    head = ["Method", *[h for h, _ in COLUMNS], "queries"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in stats:
        cells = [s["method"], *[fmt(*s[k]) for _, k in COLUMNS], str(s["queries"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, root: Path, stats: Sequence[dict[str, Any]], figures: dict[str, Path],
                   cpus: Sequence[str] = ()) -> None:
    refs = [s for s in stats if not math.isnan(s["cd_gt"][0]) or not math.isnan(s["cd_identity"][0])]
    parts = [f"# Report: {root}", "",
             "Mean ± population std: MSE, Conc. (bounding-box area of the change), in-mask (share of "
             "the change inside the ground-truth attribute mask) over queries; CD (classifier "
             "discrepancy, lower is better) over seeds; flip rate = share of valid counterfactuals; "
             "localized = share of those found by the gated search (localize=gate), not its fallback; "
             "judge = share of independent judges predicting the target (mean ± std over classifier "
             "seeds, or across judges for one job); COUT = counterfactual transition (Khorram & Fuxin "
             "2022, explained classifier); GT rec. = 1 - |x'-x_gt|^2/|x-x_gt|^2 (synthetic data). "
             "Reference rows: targeted PGD on pixels (fools this classifier) and the true counterfactuals.",
             "", markdown_table(stats), ""]
    if cpus:
        parts += [f"CPU: {', '.join(cpus)} (results differ between CPU vendors through float round-off).", ""]
    if refs:
        s = refs[0]
        parts += [f"CD references (same recipe and seeds): ground-truth counterfactuals "
                  f"{fmt(*s['cd_gt'])} (the best achievable), identity X1' = X0 {fmt(*s['cd_identity'])} "
                  f"(the worst); Acc(F; test) = {fmt(s['cd_acc_real'])}.", ""]
    parts += where_markdown(stats)
    parts += [f"![{name}]({p.name})" for name, p in figures.items()]
    path.write_text("\n".join(parts) + "\n")


def where_markdown(stats: Sequence[dict[str, Any]], width: int = 20) -> list[str]:
    """"Where the change went" (mouth / planted cue / elsewhere) as a text bar per method with
    ``in_mask`` or ``on_cue`` (report_html.change_split); [] when none has."""
    lines = []
    for s in stats:
        parts = change_split(s)
        if parts is None:
            continue
        marks = {"mouth": "M", "cue": "C", "elsewhere": "."}
        bar = "".join(marks[label] * round(width * share) for label, share, _ in parts)[:width].ljust(width, ".")
        lines.append(f"| {s['method']} | `{bar}` | " + ", ".join(f"{label} {share:.2f}" for label, share, _ in parts)
                     + " |")
    if not lines:
        return []
    return ["## Where the change went", "",
            "Share of sum |x' - x| per region, mean over the flipped queries: M = the mouth (in-mask), "
            "C = the planted cue (on-cue, `dataset.shortcut`), . = elsewhere.", "",
            "| Method | change | shares |", "|---|---|---|", *lines, ""]


def write_csv(path: Path, stats: Sequence[dict[str, Any]]) -> None:
    keys = ["mse", "concentration", "cd", "flip_rate", "in_mask", "localized", "judge_flip_rate", "cout",
            "gt_recovery", "cd_gt", "cd_identity"]
    header = ["method", "jobs", "queries"] + [f"{k}_{p}" for k in keys for p in ("mean", "std")] + \
        ["cd_acc_real", "cd_acc_cf"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for s in stats:
            values = [v for k in keys for v in s[k]]
            writer.writerow([s["method"], s["jobs"], s["queries"], *values, s["cd_acc_real"], s["cd_acc_cf"]])


def log_wandb(root: Path, methods: Sequence[Method], stats: Sequence[dict[str, Any]],
              figures: dict[str, Path], project: str, mode: str) -> None:
    """One W&B run holding the table and the figures (``wandb.finish`` always called)."""
    import wandb

    group = next((str(g) for m in methods for j in m.jobs
                  if (g := _select(j.cfg, "experiment_name")) is not None), root.name)
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{root.name}",
                     mode=mode, dir=str(root))
    try:
        head = ["method", *[h for h, _ in COLUMNS], "queries"]
        table = wandb.Table(columns=head, data=[[s["method"], *[fmt(*s[k]) for _, k in COLUMNS], s["queries"]]
                                                for s in stats])
        run.log({"report/table": table, **{f"report/{k}": wandb.Image(str(p)) for k, p in figures.items()}})
    finally:
        run.finish()


def report(root: str | Path, out: str | Path | None = None, max_queries: int = 8,
           wandb_project: str | None = None, wandb_mode: str = "offline") -> dict[str, Path]:
    """Build the report of the jobs under ``root``; returns the written files by name."""
    root = Path(root)
    out_dir = Path(out) if out is not None else root
    jobs = find_jobs(root)  # before creating anything: a mistyped root fails clean
    methods = group_methods(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = [method_stats(m) for m in methods] + reference_stats(jobs)
    figures = {}
    grid = save_method_grid(out_dir / "report_grid.png", [(m.name, [j.path for j in m.jobs]) for m in methods],
                            max_queries)
    if grid is not None:
        figures["grid"] = grid
    points = [(m.name, [(_float(r.get("mse")), _float(r.get("concentration"))) for j in m.jobs for r in j.rows])
              for m in methods]
    figures["scatter"] = save_scatter(out_dir / "report_scatter.png", points)
    write_markdown(out_dir / "report.md", root, stats, figures, environment(jobs))
    write_csv(out_dir / "report.csv", stats)
    figures_html = {"html": write_html(out_dir / "report.html", f"Report: {root}", stats,
                                       [(m.name, [j.path for j in m.jobs]) for m in methods],
                                       preferred=[*COLUMNS, ("jobs", "jobs"), ("queries", "queries")])}
    if wandb_project is not None:
        log_wandb(out_dir, methods, stats, figures, wandb_project, wandb_mode)
    return {"markdown": out_dir / "report.md", "csv": out_dir / "report.csv", **figures, **figures_html}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m disc_pl.report", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="a multirun directory (or one job directory)")
    parser.add_argument("--out", default=None, help="where to write the report (default: root)")
    parser.add_argument("--queries", type=int, default=8, help="queries shown in report_grid.png")
    parser.add_argument("--wandb", action="store_true", help="also log table and figures to W&B")
    parser.add_argument("--wandb-project", default="disc_pl")
    parser.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    args = parser.parse_args(argv)
    files = report(args.root, args.out, args.queries, args.wandb_project if args.wandb else None, args.wandb_mode)
    print(Path(files["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)


if __name__ == "__main__":
    from disc_pl import cli

    cli.guard(main)  # a user error: its message and exit status 2
