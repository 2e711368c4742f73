"""The command line as a user meets it: each bad input ends with one message naming the problem
and exit status 2, no traceback (``disc_pl.cli``). Every case fails before any training; the
battery runs the real entry points in subprocesses (``python -m disc_pl.<tool>``)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from disc_pl import cli
from disc_pl.errors import ConfigError, DatasetError

from fixtures_data import make_folder, write_garbage
from hardening_support import subprocess_env

REPO = Path(__file__).resolve().parents[1]
# A toy folder run: every size small, so a case that got past validation would still end soon.
FOLDER = ["dataset=folder", "dataset.image_size=8", "dataset.num_workers=0", "dataset.batch_size=4",
          "models.classifier.width=8", "models.classifier.fit.trainer.max_epochs=1",
          "trainer.enable_progress_bar=false", "logger=none", "prior=tv", "query.count=2",
          "query.require_correct=false"]


def _folder(tmp_path: Path, kind: str) -> Path:
    root = tmp_path / "imgs"
    if kind == "missing":
        return tmp_path / "absent"
    if kind == "empty":
        root.mkdir()
    elif kind == "class_without_images":
        make_folder(root, {"cat": 3, "dog": 3})
        (root / "emu").mkdir()
        (root / "emu" / "readme.txt").write_text("no images")
    elif kind == "corrupt":
        make_folder(root, {"cat": 3, "dog": 3})
        write_garbage(root / "dog" / "img_bad.png")
    elif kind == "ok":
        make_folder(root, {"cat": 3, "dog": 3})
    return root


# (id, tool, arguments, folder kind or None, what the message must say)
CASES = [
    ("count_not_an_int", "run", ["query.count=abc"], None, ["query.count='abc'", "must be an integer >= 1"]),
    ("count_zero", "run", ["query.count=0"], None, ["query.count=0", "must be an integer >= 1"]),
    ("unknown_group_option", "run", ["prior=gan"], None, ["Could not find 'prior/gan'", "inr"]),
    ("typo_in_key", "run", ["query.cont=3"], None, ["Could not override 'query.cont'", "+query.cont=3"]),
    ("typo_in_key_with_plus", "run", ["+query.cont=3"], None, ["query.cont=3: unknown key", "count"]),
    ("bad_override_syntax", "run", ["query.count=[1,"], None, ["cannot parse the override 'query.count=[1,'"]),
    ("unknown_split", "run", ["query.split=tset"], None, ["query.split='tset'", "test"]),
    ("gpu_without_gpu", "run", ["trainer=gpu"], None, ["trainer.accelerator", "trainer=cpu"]),
    ("byo_without_file", "run", ["model@models.classifier=byo"], None, ["models.classifier.path", "must be set"]),
    ("folder_missing", "run", FOLDER, "missing", ["image folder not found", "dataset.root="]),
    ("folder_empty", "run", FOLDER, "empty", ["no class subfolders in"]),
    ("class_without_images", "run", FOLDER, "class_without_images", ["emu", "contains no images"]),
    ("corrupt_image", "run", FOLDER, "corrupt", ["cannot read image file", "img_bad.png", "dataset.skip_corrupt=true"]),
    ("unknown_class", "run", [*FOLDER, "query.source=zebra"], "ok", ["query.source='zebra'", "cat", "dog"]),
    ("equal_classes", "run", [*FOLDER, "query.source=cat", "query.target=cat"], "ok",
     ["query.target='cat'", "must differ from query.source='cat'"]),
    ("train_bad_width", "train", ["model.width=0"], None, ["model.width=0"]),
    ("evaluate_typo", "evaluate", ["cd.n_per_clas=3"], None, ["Could not override 'cd.n_per_clas'"]),
    ("evaluate_nothing_to_do", "evaluate", ["evaluate.queries=false", "cd.enabled=false"], None,
     ["cd.enabled=false", "evaluate.queries=true"]),
    ("report_missing_dir", "report", ["{tmp}/no_sweep"], None, ["no_sweep does not exist", "multirun directory"]),
    ("bench_missing_checkpoint", "bench", ["--quick", "--checkpoint", "{tmp}/nope.ckpt"], None,
     ["--checkpoint", "nope.ckpt: no such file"]),
    ("multirun", "run -m", ["query.count=0,abc"], None, ["query.count=0", "must be an integer"]),
    ("via_disc_pl_cli", "cli run", ["query.count=-1"], None, ["query.count=-1"]),
]


def _command(tool: str, args: list[str], tmp_path: Path) -> list[str]:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    hydra_args = [f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'out'}",
                  f"hydra.sweep.dir={tmp_path / 'multirun'}", "logger=none"]
    if tool == "run -m":
        return [sys.executable, "-m", "disc_pl.run", "-m", *args, *hydra_args]
    if tool == "cli run":
        return [sys.executable, "-m", "disc_pl.cli", "run", *args, *hydra_args]
    if tool in ("report", "bench"):
        return [sys.executable, "-m", f"disc_pl.{tool}", *args]
    return [sys.executable, "-m", f"disc_pl.{tool}", *args, *hydra_args]


def run_cli(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env or subprocess_env(), cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("tool, args, folder, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_message_and_exit_status_2(tmp_path, tool, args, folder, says):
    if folder is not None:
        args = [*args, f"dataset.root={_folder(tmp_path, folder)}"]
    proc = run_cli(_command(tool, args, tmp_path))
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    for text in says:
        assert text in err, err[-3000:]
    assert cli.HINT in err
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing trained


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["debug=true", "HYDRA_FULL_ERROR=1"])
def test_debug_switch_shows_the_traceback(tmp_path, switch):
    env = subprocess_env()
    args = ["query.count=0"]
    if switch == "debug=true":
        args.append(switch)
    else:
        env["HYDRA_FULL_ERROR"] = "1"
    proc = run_cli(_command("run", args, tmp_path), env)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr and "validate_run_config" in proc.stderr


def test_guard_turns_user_errors_into_status_2_and_keeps_internal_tracebacks(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def bad_value():
        raise ConfigError.one("query.count", 0, "must be an integer >= 1")

    with pytest.raises(SystemExit) as info:
        cli.guard(bad_value, argv=[])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "Error: invalid config: query.count=0: must be an integer >= 1"

    def wrapped():  # a user error inside a library wrapper (Hydra's instantiate, Lightning)
        try:
            raise DatasetError("class folder /x/emu contains no images")
        except DatasetError as cause:
            raise RuntimeError("wrapped") from cause

    with pytest.raises(SystemExit):
        cli.guard(wrapped, argv=[])
    assert "class folder /x/emu contains no images" in capsys.readouterr().err

    def bug():
        raise KeyError("an internal error")

    with pytest.raises(KeyError):  # not the user's: the traceback is kept
        cli.guard(bug, argv=[])
    with pytest.raises(ConfigError):  # debug=true: the user error itself, with its traceback
        cli.guard(bad_value, argv=["query.count=0", "debug=true"])
    assert "HYDRA_FULL_ERROR" not in __import__("os").environ  # restored


def test_help_lists_every_config_group_and_option():
    text = cli.usage()
    for command in ("run", "train", "evaluate", "report", "bench"):
        assert f"  {command} " in text
    groups = cli.config_groups()
    assert groups["prior"] == ["dip", "inr", "tv", "warp"]
    assert {"celeba", "folder", "synthetic_faces"} <= set(groups["dataset"])
    assert groups["dataset"] == sorted(groups["dataset"])
    for group, options in groups.items():
        assert f"  {group:<16} {', '.join(options)}" in text
    # the groups are read from conf/: a new option file appears without touching the code
    assert sorted(p.stem for p in (REPO / "conf" / "manifold").glob("*.yaml")) == groups["manifold"]


@pytest.mark.slow
def test_disc_pl_help_and_unknown_command_through_the_module():
    proc = run_cli([sys.executable, "-m", "disc_pl.cli", "--help"])
    assert proc.returncode == 0 and "localize         gate, none" in proc.stdout
    proc = run_cli([sys.executable, "-m", "disc_pl.cli", "frobnicate"])
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


def test_pyproject_declares_the_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["disc-pl"] == "disc_pl.cli:main"
    module, func = scripts["disc-pl"].split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))
