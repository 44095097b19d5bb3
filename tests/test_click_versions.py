"""A bare `--compile` (an option whose value is optional) parses on every click the package accepts.

click 8.3.0 and 8.3.1 refuse it ("requires an argument"); pyproject.toml excludes them. Each
version below is installed from the package index into a folder of its own and asked to parse
`rmix train`'s options; without the index the test is skipped, saying so.
"""
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

VERSIONS = ["8.1.8", "8.2.1", "8.3.0", "8.3.1", "8.3.2"]  # the floor's last, and around the broken pair
PARSE = """
from rmix import cli
from click.testing import CliRunner
seen = {}
cli.train.callback = lambda **kw: seen.update(kw)  # parse only
r = CliRunner().invoke(cli.cli, ["train", "--compile", "--epochs", "2"], standalone_mode=False)
print(seen.get("compile") if r.exit_code == 0 else "refused: " + " ".join(r.output.split()))
"""


def accepted():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d).specifier for d in deps if Requirement(d).name == "click")


def test_pyproject_excludes_exactly_the_broken_clicks():
    spec = accepted()
    assert [v for v in VERSIONS if not spec.contains(v)] == ["8.3.0", "8.3.1"]


@pytest.mark.parametrize("version", VERSIONS)
def test_bare_compile_parses_on_each_accepted_click(version, tmp_path):
    target = tmp_path / f"click-{version}"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                          "--target", str(target), f"click=={version}"], capture_output=True, text=True, timeout=120)
    if pip.returncode != 0:
        pytest.skip(f"click {version} could not be installed here: {pip.stderr.strip()[-200:]}")
    r = subprocess.run([sys.executable, "-c", PARSE], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0, r.stderr[-2000:]
    got = r.stdout.strip().splitlines()[-1]
    if accepted().contains(version):
        assert got == "default", got
    else:  # why pyproject excludes it
        assert got.startswith("refused") and "--compile" in got, got  # it takes the next option as its value
