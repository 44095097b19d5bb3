"""The suite's own properties: conftest.process_state_is_restored makes a test that leaves process-wide
state changed an error naming what it changed, and the tests after it see the state restored; and no
test module imports another."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LEAKS = '''
import os, signal, torch

def test_a_leaks_an_environment_variable():
    os.environ["RMIX_GUARD_PROBE"] = "1"

def test_b_sees_it_gone():
    assert "RMIX_GUARD_PROBE" not in os.environ

def test_c_leaks_determinism_and_a_handler():
    torch.use_deterministic_algorithms(True)
    signal.signal(signal.SIGUSR1, lambda *a: None)

def test_d_sees_them_restored():
    assert not torch.are_deterministic_algorithms_enabled()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

def test_e_changes_the_directory(tmp_path):
    os.chdir(tmp_path)
'''


@pytest.mark.slow
def test_a_test_that_leaks_process_state_is_an_error_and_the_next_one_is_clean(tmp_path):
    for name in ("conftest.py", "helpers.py"):  # conftest's fixtures are built with helpers
        shutil.copy(Path(__file__).with_name(name), tmp_path / name)
    (tmp_path / "test_leaks.py").write_text(LEAKS)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                        "-o", "addopts=", str(tmp_path / "test_leaks.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    out = r.stdout
    assert r.returncode == 1, out
    assert "5 passed, 3 errors" in out, out
    assert "RMIX_GUARD_PROBE" in out and "deterministic_algorithms" in out and "signals" in out and "cwd" in out


def imports_of_test_modules(folder):
    """'file:line imports name' for each import, in any .py file of `folder`, of a test module or conftest."""
    test_modules = {p.stem for p in folder.glob("test_*.py")} | {"conftest"}
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names if not node.module]  # `from . import x`
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "tests":  # `from tests.test_x import ...`
                    parts = parts[1:]
                if parts and parts[0] in test_modules:
                    found.append(f"{path.name}:{node.lineno} imports {name}")
    return found


def test_no_test_module_imports_another():
    # what several test modules share lives in helpers.py (functions, constants) and conftest.py
    # (fixtures): a test module that imports another breaks when that one's tests change
    assert imports_of_test_modules(Path(__file__).parent) == []


def test_the_import_check_sees_each_form(tmp_path):
    (tmp_path / "test_a.py").write_text("X = 1\n")
    (tmp_path / "helpers.py").write_text("import os\nfrom pathlib import Path\n")
    (tmp_path / "test_b.py").write_text("import test_a\n\n\ndef f():\n    from tests.test_a import X\n"
                                        "    from conftest import fixture\n")
    assert imports_of_test_modules(tmp_path) == ["test_b.py:1 imports test_a", "test_b.py:5 imports tests.test_a",
                                                 "test_b.py:6 imports conftest"]
