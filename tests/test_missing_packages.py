"""A package the asked-for path needs, missing: one line saying what to install, never a traceback."""
import sys

import pytest
import torch
from click.testing import CliRunner

from rmix.cli import cli


@pytest.fixture
def no_dali(monkeypatch):
    """As on a machine without DALI: importing nvidia.dali fails, rmix's DALI module is not loaded yet."""
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    monkeypatch.delitem(sys.modules, "rmix.pipelines.dali", raising=False)


@pytest.mark.parametrize("preflight", ["--preflight", "--no-preflight"])
def test_training_on_dali_without_dali_says_what_to_install(jpeg_folder_4x6, tmp_path, no_dali, preflight):
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(tmp_path / "run"),
                                 "--epochs", "1",
                                 "--model", "resnet8", "--crop-size", "16", "--val-resize", "20", "--batch-size", "8",
                                 preflight])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith("Error: --loader dali: NVIDIA DALI is not installed"), r.output
    major = (torch.version.cuda or "13").split(".")[0]
    assert f"pip install nvidia-dali-cuda{major}0" in line and "--loader torch" in line
    assert not (tmp_path / "run" / "latest.pt").exists()


@pytest.mark.slow
def test_the_torch_loader_needs_no_dali(jpeg_folder_4x6, tmp_path, no_dali):
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(tmp_path / "run"),
                                 "--epochs", "1",
                                 "--model", "resnet8", "--crop-size", "16", "--val-resize", "20", "--loader", "torch",
                                 "--batch-size", "8", "--no-preflight"])
    assert r.exit_code == 0, r.output


def test_a_timm_model_without_timm_says_what_to_install(jpeg_folder_4x6, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(tmp_path / "run"),
                                 "--epochs", "1",
                                 "--model", "timm/resnet18", "--crop-size", "16", "--val-resize", "20", "--batch-size",
                                 "8", "--loader", "torch", "--no-preflight"])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "pip install 'rmix[timm]'" in line, r.output


def test_a_timm_that_does_not_import_is_not_called_missing(jpeg_folder_4x6, tmp_path, monkeypatch):
    broken = tmp_path / "site" / "timm"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("from .models import create_model\n")  # its models/ is gone
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(tmp_path / "run"),
                                 "--epochs", "1",
                                 "--model", "timm/resnet18", "--crop-size", "16", "--val-resize", "20", "--batch-size",
                                 "8", "--loader", "torch", "--no-preflight"])
    assert r.exit_code == 2, r.output
    assert "timm is installed but does not import" in r.output and "timm.models" in r.output, r.output
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]  # the real timm again for the tests after this one
