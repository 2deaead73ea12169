"""llavakit installs as a package, not only as a checkout.

The wheel is built from a copy of the sources, installed (without dependencies) into a new venv
that borrows this environment's packages, and then used from a folder outside the checkout:
`llavakit smoke`, `llavakit demo --help`, both demo recipes loaded from the installed package, and
a minute-sized demo run through the installed package's own pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r.stdout


def _can_build_here() -> bool:
    """This environment can build the wheel without build isolation (no download): setuptools >= 70.1
    (the [dev] extra's), or >= 68 (pyproject's build requirement) with the `wheel` package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or (major >= 68 and importlib.util.find_spec("wheel") is not None)


def _build_wheel(tmp: Path, env) -> Path:
    # build from a copy: an in-tree build would leave build/ behind, whose stale files can end up in a wheel
    src = tmp / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    isolation = ["--no-build-isolation"] if _can_build_here() else []  # else pip fetches setuptools itself
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", tmp / "dist", src], tmp, env)
    (wheel,) = (tmp / "dist").glob("llavakit-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONNOUSERSITE="1")
    wheel = _build_wheel(tmp_path, env)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path, env)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp_path, env)
    # the dependencies (torch, transformers, ...) come from this environment: its site-packages are
    # appended to the new venv's sys.path, after the venv's own site-packages (so the wheel's llavakit
    # wins), as plain path lines (so this environment's editable-install .pth is not processed)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_borrowed_deps.pth").write_text("".join(f"{p}\n" for p in ours))

    work = tmp_path / "elsewhere"  # outside the checkout: nothing is found relative to the sources
    work.mkdir()
    assert REPO not in work.parents
    where = json.loads(_run([py, "-c", "import json, llavakit; from llavakit.demo.pipeline import recipes_dir; "
                                       "print(json.dumps([llavakit.__file__, str(recipes_dir())]))"], work, env))
    for path in where:
        assert Path(path).is_relative_to(site), (path, site)

    out = _run([venv / "bin" / "llavakit", "smoke", "--out", work / "smoke"], work, env)
    assert "reload gives identical logits: True" in out, out
    assert "--scale" in _run([venv / "bin" / "llavakit", "demo", "--help"], work, env)

    # both recipes, read from the installed package by the function the demo uses, then a demo run
    # through the installed pipeline (every phase, both `llavakit train` stages), sized to a minute
    script = textwrap.dedent("""
        import sys
        from llavakit.demo import pipeline
        from llavakit.train.config import load_config

        d = pipeline.recipes_dir()
        s1, s2 = load_config(d / "stage1.yaml"), load_config(d / "stage2.yaml")
        assert (s1.train.stage, s1.data.template) == ("pretrain", "plain"), s1
        assert (s2.train.stage, s2.data.template) == ("finetune", "vicuna_v1"), s2
        pipeline.SCALES["wheel"] = pipeline.Scale(
            world={"n_train": 48, "n_test": 1}, lm={"steps": 3}, clip={"steps": 3},
            stage1=["--train.max_steps=2"], stage2=["--train.max_steps=2"])
        metrics = pipeline.run_demo(sys.argv[1], seed=0, scale="wheel", say=lambda *a, **k: None)
        print(sorted(metrics["types"]))
    """)
    out = _run([py, "-c", script, work / "demo"], work, env)
    assert "two_image" in out, out
    for name in ("metrics.json", "predictions.jsonl", "sample_conversation.txt", "model/config.json"):
        assert (work / "demo" / name).is_file(), name
