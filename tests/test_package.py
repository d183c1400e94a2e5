"""The design card's layout installs into the `comet` namespace, both ways, and nothing else; from
whatever environment the tests run in (a venv, a conda env, a system Python)."""
import importlib.util
import os
import shutil
import site
import subprocess
import sys
from importlib import metadata
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


def _can_build_here() -> bool:
    """Whether the running environment has what building comet takes (setuptools >= 64 with a
    bdist_wheel command: its own from 70.1, else the `wheel` package's)."""
    try:
        version = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1) or (version >= (64, 0) and importlib.util.find_spec("wheel") is not None)


def _output(command: list, cwd, env=None) -> str:
    """stdout of `command`, which must succeed; its stdout and stderr in the failure message."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (f"{' '.join(command)} exited with {result.returncode}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


def _pip(python, *args, cwd):
    """`pip install --no-deps ARGS` into `python`'s environment; without build isolation where the
    running environment can build (else pip fetches the build requirements, as `make install`
    did)."""
    isolation = ["--no-build-isolation"] if _can_build_here() else []
    _output([python, "-m", "pip", "install", "-q", "--no-deps", *isolation, *args], cwd)


def _venv_with_running_packages(path: Path) -> str:
    """The python of a new venv of the running interpreter that also sees, after its own, the
    running environment's packages (pip, setuptools, torch), wherever they are: a venv's base
    interpreter (what --system-site-packages would add) lacks them."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = str(path / "bin" / "python")
    own = _output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], path).strip()
    running = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    Path(own, "running_environment.pth").write_text("".join(f"{p}\n" for p in running))
    return python


def _run(python, cwd, env=None):
    out = _output([python, "-c", IMPORT_CHECK.format(subs=list(SUBPACKAGES))], cwd, env)
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
    _pip(sys.executable, "--target", str(target), str(src), cwd=tmp_path)
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
    python = _venv_with_running_packages(tmp_path / "venv")
    _pip(python, "-e", str(src), cwd=tmp_path)
    files = _run(python, tmp_path)
    for sub, folder in SUBPACKAGES.items():
        assert Path(files[sub]).is_relative_to(src / folder), (sub, files[sub])


def _setup_cfg_requirements(section: str, key: str) -> list[str]:
    """The project names a setup.cfg requirement list holds (versions dropped)."""
    import configparser
    import re

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return [re.split(r"[<>=!~ \[;]", line.strip())[0] for line in parser[section][key].splitlines() if line.strip()]


def _imported_top_level_modules() -> set[str]:
    """Top-level modules imported anywhere in the installed package's source."""
    import ast

    modules = set()
    for folder in ("comet", *SUBPACKAGES.values()):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules


def test_declared_dependencies_are_used_and_listed_in_the_readme():
    """Every install requirement is imported by the package (none declared for nothing), and the
    README's install lines name exactly what `pip install -e .` and `.[test]` add."""
    required = _setup_cfg_requirements("options", "install_requires")
    test_extra = _setup_cfg_requirements("options.extras_require", "test")
    imported = _imported_top_level_modules()
    module_of = {"megatron-core": "megatron"}  # project name -> import name, where they differ
    unused = [name for name in required if module_of.get(name, name).replace("-", "_") not in imported]
    assert not unused, f"install_requires lists {unused}, which nothing in the package imports"
    readme = (ROOT / "README.md").read_text()
    lines = {line.split("#")[0].strip(): line.split("#", 1)[1] for line in readme.splitlines()
             if line.startswith("pip install -e ")}
    listed = lambda text: {w.strip(" ,.+") for w in text.split("(")[0].split(",")} - {""}  # noqa: E731
    assert listed(lines["pip install -e ."]) == set(required)
    assert listed(lines["pip install -e '.[test]'"]) == set(test_extra) - set(required)
