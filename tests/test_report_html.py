"""report.html: a static page (no network) with a sortable method table, per-query
counterfactuals side by side and status filters; checked as HTML and in headless Chromium.

The job directories are written by hand (metrics.json, .hydra/, results.csv, counterfactuals.pt
with known tensors), so every figure on the page is known; a slow test puts a real 2-job sweep
through the same path."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from disc_pl import report as report_lib
from disc_pl.report_html import method_table, table_columns

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed "
                                    "(Debian: apt-get install chromium)")
FIELDS = ["query_id", "status", "flipped", "target_prob", "mse", "concentration"]


def write_job(job: Path, prior: str, mse: list[float], status: list[str], judge: list[str] | None = None,
              delta: float = 0.1) -> None:
    """A finished run job: 3 queries of 4x4 gray pixels, the counterfactual = query + delta in one pixel."""
    (job / ".hydra").mkdir(parents=True)
    cfg = {"prior": {"name": prior}, "space": {"name": "lso"}, "manifold": {"name": "dep"}, "seed": 0}
    OmegaConf.save(OmegaConf.create(cfg), job / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"prior={prior}"]), job / ".hydra" / "overrides.yaml")
    fields = FIELDS + (["judge_verdict"] if judge else [])
    with (job / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for i, (m, s) in enumerate(zip(mse, status)):
            row = {"query_id": i, "status": s, "flipped": s == "flipped", "target_prob": 0.9 - 0.1 * i, "mse": m,
                   "concentration": 0.5}
            if judge:
                row["judge_verdict"] = judge[i]
            w.writerow(row)
    q = torch.full((3, 1, 4, 4), 0.5)
    cf = q.clone()
    cf[:, 0, 1, 2] += delta
    torch.save({"query_id": torch.arange(3), "query": q, "counterfactual": cf}, job / "counterfactuals.pt")
    flipped = sum(s == "flipped" for s in status) / len(status)
    (job / "metrics.json").write_text(json.dumps({"cf/flip_rate": flipped, "cf/mse": sum(mse) / 3}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    write_job(root / "0", "tv", [0.3, 0.3, 0.3], ["flipped", "flipped", "not_flipped"],
              judge=["valid", "valid", "invalid"], delta=0.4)
    write_job(root / "1", "inr", [0.01, 0.02, 0.03], ["flipped", "diverged", "flipped"], delta=0.05)
    return root


class Page(HTMLParser):
    """Collects the method table's rows (data-method, in order), the per-query cells and images."""

    def __init__(self) -> None:
        super().__init__()
        self.methods: list[str] = []
        self.headers: list[str] = []
        self.cells: list[dict] = []
        self.images: list[str] = []
        self.scripts_src: list[str] = []
        self.rows_hidden: list[bool] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-method" in a:
            self.methods.append(a["data-method"])
        if tag == "tr" and "data-query" in a:
            self.rows_hidden.append("hidden" in (a.get("class") or "").split())
        if tag == "th" and "data-key" in a:
            self.headers.append(a["data-key"])
        if tag == "td" and "data-status" in a:
            self.cells.append(a)
        if tag == "img":
            self.images.append(a["src"])
        if tag in ("script", "link") and (a.get("src") or a.get("href")):
            self.scripts_src.append(a.get("src") or a.get("href"))


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    return page


def test_report_html_is_self_contained_with_every_method_query_and_figure(sweep):
    files = report_lib.report(sweep)
    text = Path(files["html"]).read_text()
    page = parse(text)
    assert page.methods == ["LSO+TV+L2+DEP", "LSO+INR+DEP"]  # the report's (paper) order
    assert page.headers[:4] == ["method", "mse", "concentration", "cd"] and "queries" in page.headers
    assert page.scripts_src == [] and "http://" not in text and "https://" not in text  # nothing to fetch
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    # one query image per query + (counterfactual, change) per method and query + the colour bar
    assert len(page.images) == 3 + 3 * 2 * 2 + 1
    assert [c["data-status"] for c in page.cells] == ["flipped", "flipped", "flipped", "diverged",
                                                    "not_flipped", "flipped"]
    assert "judge: invalid" in text and "p(target)=0.70" in text
    # one change scale for the page: the largest change (0.4, the TV job)
    assert "from 0 to 0.4." in text
    # the MSE cell of the INR method is its mean ± std over its flipped queries (0.01 and 0.03)
    assert "0.02 ± 0.01" in text and "0.00816" not in text


def test_extra_rows_and_columns_just_appear():
    nan = float("nan")
    stats = [{"method": "A", "mse": (0.1, 0.01), "queries": 3, "cd_gt": (nan, nan)},
             {"method": "PGD (reference)", "mse": (0.5, 0.1), "cout": (0.7, 0.0), "reference": True, "queries": 3}]
    cols = table_columns(stats, preferred=[("MSE", "mse"), ("CD", "cd")])
    assert cols == [("MSE", "mse"), ("queries", "queries"), ("cout", "cout")]  # CD: in no row; cd_gt: no value
    table = method_table(stats, cols)
    assert '<tr data-method="PGD (reference)" class="reference">' in table and "0.7 ± 0" in table


def _chromium(args: list[str], out_dir: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={out_dir / 'chromium-profile'}", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def dumped_order(html_file: Path, fragment: str, tmp_path: Path) -> tuple[list[str], Page]:
    proc = _chromium(["--dump-dom", f"{html_file.as_uri()}#{fragment}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = parse(proc.stdout)
    return page.methods, page


@needs_chromium
def test_browser_sorts_filters_and_renders(sweep, tmp_path):
    html_file = Path(report_lib.report(sweep)["html"])
    order, page = dumped_order(html_file, "sort=mse", tmp_path)
    assert order == ["LSO+INR+DEP", "LSO+TV+L2+DEP"]  # ascending MSE: 0.02 < 0.3
    order, _ = dumped_order(html_file, "sort=mse:desc", tmp_path)
    assert order == ["LSO+TV+L2+DEP", "LSO+INR+DEP"]
    order, _ = dumped_order(html_file, "sort=flip_rate:desc", tmp_path)
    assert order == ["LSO+TV+L2+DEP", "LSO+INR+DEP"] or order == ["LSO+INR+DEP", "LSO+TV+L2+DEP"]  # tie 2/3
    # the status filter: only "diverged" leaves query 1 (the INR job's diverged one) visible
    _, page = dumped_order(html_file, "status=diverged", tmp_path)
    assert page.rows_hidden == [True, False, True]
    shot = tmp_path / "report.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1200,900", html_file.as_uri()], tmp_path)
    assert proc.returncode == 0 and shot.stat().st_size > 10_000, proc.stderr[-2000:]


@pytest.mark.slow
@needs_chromium
def test_report_of_a_real_two_job_sweep_renders_in_chromium(tmp_path, cache_dir):
    toy = ["dataset.n_train=1200", "dataset.n_val=200", "dataset.n_test=300", "models.classifier.width=8",
           "models.classifier.fit.trainer.max_epochs=3", "models.classifier.lr=3e-3",
           "trainer.enable_progress_bar=false", "inversion.steps_per_stage=10", "inversion.min_steps=2",
           "logger=none", "prior=tv", "prior.stages=[[all]]", "query.count=4", "query.batch_size=4"]
    sweep = tmp_path / "multirun"
    proc = subprocess.run([sys.executable, "-m", "disc_pl.run", "-m", *toy, "space=iso,lso", f"cache_dir={cache_dir}",
                           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra:job.num}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "disc_pl.report", str(sweep)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html_file = sweep / "report.html"
    order, page = dumped_order(html_file, "sort=method:desc", tmp_path)
    assert order == ["LSO+TV+L2+DEP", "ISO+TV+L2+DEP"]
    stats = {r["method"]: float(r["mse_mean"]) for r in csv.DictReader((sweep / "report.csv").open())}
    order, _ = dumped_order(html_file, "sort=mse", tmp_path)
    assert order == sorted(stats, key=stats.get)
    assert len(page.cells) == 2 * 4 and len(page.images) == 4 + 2 * 4 * 2 + 1
    assert re.search(r"from 0 to [0-9.e-]+\.", html_file.read_text())
