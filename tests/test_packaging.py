"""A non-editable install finds its configs: the wheel ships conf/ as disc_pl/conf."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_lists_every_package_of_src():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "disc_pl").rglob("__init__.py")
             for p in [p.parent]}
    assert set(setup["packages"]) == found | {"disc_pl.conf"}
    assert setup["package-dir"]["disc_pl.conf"] == "conf"


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_composes_the_run_config_from_another_directory(tmp_path):
    src = tmp_path / "src_copy"  # build from a copy: no build/ or egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "build",
                                                              "*.egg-info", "__pycache__", ".pytest_cache"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, env=env, timeout=600)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # Dependencies come from this interpreter's site-packages (a .pth entry: no download, and
    # unlike --system-site-packages no editable disc_pl, whose own .pth is not processed there).
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    wheel = next(wheels.glob("disc_pl-*.whl"))
    subprocess.run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, env=env, timeout=300)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    proc = subprocess.run([str(python), "-m", "disc_pl.run", "--cfg", "job", "prior=dip", "logger=none"],
                          cwd=empty, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_target_: disc_pl.cf.priors.DIPPrior" in proc.stdout and "name: dip" in proc.stdout
    where = subprocess.check_output([str(python), "-c", "import disc_pl.utils as u; print(u.CONF_DIR)"],
                                    cwd=empty, text=True, env=env).strip()
    assert Path(where).is_relative_to(site) and (Path(where) / "prior" / "inr.yaml").is_file()
    assert list(empty.iterdir()) == []  # --cfg job writes nothing
