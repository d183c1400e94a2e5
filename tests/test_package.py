"""The design card's layout installs into the `comet` namespace, both ways, and nothing else."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"comet.kernels": "csrc_free_kernels", "comet.scheduler": "scheduler",
               "comet.integrations": "integrations"}
IMPORT_CHECK = (
    "import importlib, importlib.util, comet\n"
    "for name in {subs!r}:\n"
    "    print(name, importlib.import_module(name).__file__)\n"
    "for top in ('scheduler', 'integrations', 'csrc_free_kernels'):\n"
    "    assert importlib.util.find_spec(top) is None, top + ' is importable at top level'\n"
)


def _pip(*args, cwd):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    *args], cwd=cwd, check=True, capture_output=True, text=True)


def _run(python, cwd, env=None):
    out = subprocess.run([python, "-c", IMPORT_CHECK.format(subs=list(SUBPACKAGES))], cwd=cwd, env=env,
                         check=True, capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


def _copy_source(dst: Path) -> Path:
    src = dst / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "__pycache__",
                                                             "bench", "tests"))
    return src


@pytest.mark.timeout(600)
def test_pip_install_regular(tmp_path):
    src = _copy_source(tmp_path)
    target = tmp_path / "site"
    _pip("--target", str(target), str(src), cwd=tmp_path)
    installed = {p.name for p in target.iterdir()}
    assert "comet" in installed
    assert not installed & {"scheduler", "integrations", "csrc_free_kernels"}, installed
    for sub, folder in SUBPACKAGES.items():
        assert (target / "comet" / sub.split(".")[1] / "__init__.py").is_file(), sub
    env = dict(os.environ, PYTHONPATH=str(target))
    files = _run(sys.executable, tmp_path, env)
    for sub, path in files.items():
        assert Path(path).is_relative_to(target), (sub, path)


@pytest.mark.timeout(600)
def test_pip_install_editable(tmp_path):
    src = _copy_source(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(src)],
                   cwd=tmp_path, check=True, capture_output=True, text=True)
    files = _run(python, tmp_path)
    for sub, folder in SUBPACKAGES.items():
        assert Path(files[sub]).is_relative_to(src / folder), (sub, files[sub])
