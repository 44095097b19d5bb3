"""The suite's own guard (conftest.process_state_is_restored): a test that leaves process-wide state
changed is an error naming what it changed, and the tests after it see the state restored."""
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_a_test_that_leaks_process_state_is_an_error_and_the_next_one_is_clean(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_leaks.py").write_text(LEAKS)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                        "-o", "addopts=", str(tmp_path / "test_leaks.py")], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    out = r.stdout
    assert r.returncode == 1, out
    assert "5 passed, 3 errors" in out, out
    assert "RMIX_GUARD_PROBE" in out and "deterministic_algorithms" in out and "signals" in out and "cwd" in out
