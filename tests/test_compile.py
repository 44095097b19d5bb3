"""--compile: torch.compile of the model with its RoI head; checkpoints, exports and resume unaffected.

Inductor builds C++ kernels on the CPU (a compiler is needed, as on any CPU machine running it).
"""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers import train_args
from rmix.cli import cli
from rmix.engine import compile_model
from rmix.models import build

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is missing")


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each test compiles from a clean slate and leaves no graph to the tests after it (any order)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_model_computes_what_the_eager_one_does():
    torch.manual_seed(0)
    model = build("resnet8", 5).train()
    x, boxes = torch.randn(4, 3, 16, 16), torch.tensor([[0, 0, 8, 8], [2, 2, 16, 16], [0, 0, 16, 16], [4, 0, 12, 9]])
    eager = [t.detach() for t in model(x, boxes)]
    compiled = compile_model(model, "default")
    got = compiled(x, boxes)
    for g, e in zip(got, eager):
        torch.testing.assert_close(g.detach(), e, rtol=1e-4, atol=1e-4)
    got[0].sum().backward()  # the backward compiles too
    assert model.fc.weight.grad is not None and compile_model(model, "none") is model


@pytest.mark.slow
def test_train_with_compile_saves_plain_keys_and_resumes(jpeg_folder_4x6, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, "--compile", "--epochs", "2", "--max-steps", "2"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["compile"] == "default"  # bare --compile: mode default
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["model"])
    build("resnet8", 4).load_state_dict(ckpt["model"], strict=True)
    # --compile is how fast, not what is trained: a resume may drop it
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, "--epochs", "2", "--max-steps", "2",
                                           "--resume", "auto"))
    assert r.exit_code == 0 and "complete" in r.output, r.output
    r = CliRunner().invoke(cli, ["export", str(out / "best.pt"), "--format", "torchvision", "--out",
                                 str(tmp_path / "w.pth")])
    assert r.exit_code == 0, r.output


def test_bad_compile_mode_is_one_line(jpeg_folder_4x6, tmp_path):
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, tmp_path / "run", "--compile", "fastest"))
    assert r.exit_code == 2 and "--compile" in r.output and "Traceback" not in r.output
