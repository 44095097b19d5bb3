"""A checkpoint saved by a CUDA run resumes on the CPU exactly: optimizer state follows its parameter.

A CUDA run keeps its model channels_last, so its checkpoint holds channels_last momentum buffers;
`Optimizer.load_state_dict` keeps saved strides, and the fused kernels need the parameter's.
"""
import pytest
import torch
from click.testing import CliRunner

from helpers import Cut, assert_same_run, cut_after_save, train_args
from rmix import checkpoint
from rmix.cli import cli
from rmix.optim import match_param_layout  # noqa


def as_cuda_run_saves(t):
    return t.to(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4 else t


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_channels_last_checkpoint_resumes_on_the_cpu_bit_identically(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                       optimizer):
    args = ("--loader", "torch", "--optimizer", optimizer)
    ref = tmp_path / "ref"
    assert CliRunner().invoke(cli, train_args(jpeg_folder_4x6, ref, *args)).exit_code == 0
    real = cut_after_save(monkeypatch, 1, 0)  # the process ends right after epoch 1's checkpoint
    out = tmp_path / "moved"
    assert isinstance(CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *args)).exception, Cut)
    monkeypatch.setattr(checkpoint, "save", real)
    ckpt = checkpoint.read(out / "latest.pt")
    ckpt["model"] = {k: as_cuda_run_saves(v) for k, v in ckpt["model"].items()}
    for state in ckpt["optimizer"]["state"].values():
        state.update({k: as_cuda_run_saves(v) for k, v in state.items()})
    laid_out = [v for s in ckpt["optimizer"]["state"].values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() == 4 and not v.is_contiguous()]
    assert laid_out  # the test moves something
    checkpoint.save(out / "latest.pt", ckpt)
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *args, "--resume", "auto"))
    assert r.exit_code == 0, r.output
    assert_same_run(out, ref)


def test_state_takes_the_parameters_layout_dtype_and_device():
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    saved = {conv.weight: {"momentum_buffer": torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)},
             conv.bias: {"momentum_buffer": torch.randn(4, dtype=torch.float64)}}
    opt.state.update({p: dict(s) for p, s in saved.items()})
    match_param_layout(opt)
    for p, s in saved.items():
        buf = opt.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride() and buf.dtype == p.dtype and buf.device == p.device
        assert torch.equal(buf, s["momentum_buffer"].to(p.dtype))
