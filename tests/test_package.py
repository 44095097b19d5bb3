"""The package's shape: one import name, `rmix`, whatever the install; the data side stands alone.

The built wheel itself is checked by .ci/wheel (fresh environments, no checkout on the path).
"""
import ast
import os
import subprocess
import sys

import pytest

from helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

MAPPED = {"rmix": ROOT / "rmix", "rmix.pipelines": ROOT / "pipelines", "rmix.kernels": ROOT / "kernels"}


def setuptools_table():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_in_the_distribution():
    table = setuptools_table()
    assert table["package-dir"] == {"rmix.pipelines": "pipelines", "rmix.kernels": "kernels"}
    found = set()
    for name, folder in MAPPED.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found == set(table["packages"])  # a new subpackage not listed would be missing from the wheel
    assert (ROOT / "rmix/cli.py").resolve() == (ROOT / "cli.py").resolve()  # rmix.cli is the top-level cli.py


def run(code_or_args, cwd):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_only_rmix_is_importable_outside_the_checkout(tmp_path):
    r = run("import importlib.util as u; print([n for n in ('cli', 'pipelines') if u.find_spec(n)])", tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    r = run("import rmix.cli, rmix.pipelines.synth, rmix.kernels; print(rmix.kernels.recursive_mix.__module__)",
            tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "rmix.kernels", r.stderr


@pytest.mark.slow
def test_python_m_rmix_is_the_command(tmp_path):
    r = run(["-m", "rmix", "models"], tmp_path)
    assert r.returncode == 0 and "resnet8" in r.stdout, r.stderr
    r = run(["-m", "rmix", "train", "--epochs", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "Error: --epochs: must be positive, got 0", r.stderr


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize("side", ["pipelines", "kernels"])
def test_the_data_side_and_the_op_need_nothing_of_the_trainer(side):
    for path in (ROOT / side).rglob("*.py"):
        for module in imports(path):
            assert not module.startswith("rmix") or module.startswith(f"rmix.{side}"), \
                f"{path.relative_to(ROOT)} imports {module}"
