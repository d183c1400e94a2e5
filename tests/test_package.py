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


# The ground floor (ARCHITECTURE.md): core types and small utilities that import nothing above them.
GROUND_FLOOR = {"comet.backend_registry", "comet.comm", "comet.config", "comet.device_info", "comet.hf_family_table",
                "comet.measurement", "comet.multiprocess", "comet.validation", "comet.weights"}


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its source (function-level imports
    too), read with `ast` from the folders setup.cfg installs (`comet.kernels` is csrc_free_kernels/, ...)."""
    import ast

    folders = {"comet": "comet", **SUBPACKAGES}
    modules = {}
    for package, folder in folders.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                # `from comet import ops` imports the module comet.ops; `from comet.x import f`, comet.x
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            imported.update(t for t in targets if t in modules and t != name)
        graph[name] = imported
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first again at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    """No module of the package imports, directly or through others, one that imports it back
    (lazy, function-level imports count: they are dependencies too)."""
    graph = _package_imports()
    assert {"comet.ep", "comet.kernels.expert_gemm", "comet.scheduler.ep_split", "comet.integrations.hf"} <= set(graph)
    assert "comet.ops" in graph["comet.backends"]  # the reader sees `from comet import ops`
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_import():
    """The ground floor imports only the ground floor; the kernels and the scheduler import, of
    comet's own modules, only the ground floor (and each other: the scheduler stands on the kernels)."""
    graph = _package_imports()
    assert GROUND_FLOOR <= set(graph)
    for name, imported in graph.items():
        if name in GROUND_FLOOR:
            allowed = GROUND_FLOOR
        elif name.startswith("comet.kernels"):
            allowed = GROUND_FLOOR | {m for m in graph if m.startswith("comet.kernels")}
        elif name.startswith("comet.scheduler"):
            allowed = GROUND_FLOOR | {m for m in graph if m.startswith(("comet.kernels", "comet.scheduler"))}
        else:
            continue
        upward = sorted(imported - allowed)
        assert not upward, f"{name} imports {upward}, above it"
