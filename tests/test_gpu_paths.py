"""The choices rmix makes only on a GPU, checked here without one (capabilities mocked, graphs defined
but not built): the autocast dtype, determinism settings, nvJPEG's preallocation, evaluation's reads."""
import pytest
import torch

from helpers import train_args
from rmix import config as C
from rmix import engine
from rmix.dist import Dist
from rmix.engine import amp_dtype, auto_amp, compile_mode_for, set_determinism
from rmix.syncs import SyncCounter  # eval_reads keeps only rmix.engine's reads


@pytest.mark.parametrize("capability,want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                             ((8, 9), "bf16"), ((9, 0), "bf16"), ((10, 0), "bf16")])
def test_amp_auto_is_bf16_only_where_it_is_native(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    choice, why = auto_amp(cuda)
    assert choice == want and f"sm_{capability[0]}{capability[1]}" in why
    dtype = amp_dtype(C.TrainConfig(amp="auto"), cuda)
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[want]
    assert amp_dtype(C.TrainConfig(amp="bf16"), cuda) == torch.bfloat16  # asked for: kept


def test_amp_auto_on_the_cpu_is_fp32():
    assert auto_amp(torch.device("cpu"))[0] == "none" and amp_dtype(C.TrainConfig(), torch.device("cpu")) is None


@pytest.fixture
def torch_flags():
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def unset(monkeypatch, name):
    """Remove `name` from the environment for the test, and whatever the test sets it to after it."""
    monkeypatch.setenv(name, "")  # recorded, so the undo removes what the code under test sets
    monkeypatch.delenv(name)


def test_deterministic_sets_every_switch_and_benchmark_is_its_opposite(torch_flags, monkeypatch):
    unset(monkeypatch, "CUBLAS_WORKSPACE_CONFIG")
    set_determinism(True, torch.device("cuda", 0))
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled()
    import os
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    set_determinism(False, torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled()
    set_determinism(False, torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark  # nothing to benchmark on the CPU


@pytest.mark.slow
def test_deterministic_is_a_runtime_setting_of_the_cli(jpeg_folder_4x6, tmp_path, torch_flags, monkeypatch):
    unset(monkeypatch, "CUBLAS_WORKSPACE_CONFIG")  # --deterministic sets it for the process
    from click.testing import CliRunner

    from rmix.cli import cli
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, "--deterministic", "--epochs", "1",
                                           "--max-steps", "1"))
    assert r.exit_code == 0, r.output
    assert C.from_dict(__import__("json").loads((out / "config.json").read_text())).deterministic is True
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, "--no-deterministic", "--epochs", "2",
                                           "--max-steps", "1", "--resume", "auto", "--allow-changes", "epochs"))
    assert r.exit_code == 0, r.output  # like --compile: how it runs, not what it trains


@pytest.mark.parametrize("mode,want", [("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs"),
                                       ("default", "default"), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
                                       ("none", "none")])
def test_cuda_graph_compile_modes_are_mapped_under_torchrun_only(mode, want):
    two = Dist(rank=0, world_size=2, local_rank=0)
    got, why = compile_mode_for(mode, two)
    assert got == want and (why is None) == (mode == want)
    if why:
        assert why.startswith(f"--compile {mode}:") and repr(want) in why and "pytorch#139207" in why
    assert compile_mode_for(mode, Dist()) == (mode, None)  # one process: as asked
    # micro-batches, on one process too: CUDA graph replays would overwrite the micro-batches' gradients
    got, why = compile_mode_for(mode, Dist(), accum=2)
    assert got == want and (why is None) == (mode == want)
    if why:
        assert why.startswith(f"--compile {mode}: its CUDA graphs keep only the last micro-batch's gradients of an "
                              "--accum-steps 2 step (pytorch#169545") and repr(want) in why


@pytest.mark.parametrize("threads", [1, 3, 8, 12, 13, 16, 32])
def test_nvjpeg_preallocation_is_bounded_per_pipeline_and_never_below_dalis_defaults(threads):
    from nvidia.dali import fn, pipeline_def

    from rmix.pipelines import Crop
    from rmix.pipelines.dali import DEVICE_PADDING_PER_PIPELINE, HOST_PADDING_PER_PIPELINE, decode_and_augment

    @pipeline_def
    def graph(train):
        return decode_and_augment(fn.external_source(name="jpegs"), Crop(32, min_area=0.1, val_resize=36, aug_plus=False),
                                  train=train, dali_device="gpu")

    for train in (True, False):
        pipe = graph(train, batch_size=2, num_threads=threads, device_id=0)  # defined, never built: no GPU here
        pipe._build_graph()
        specs = [str(op.spec) for op in pipe._ops if "padding" in str(op.spec)]
        assert len(specs) == 1, specs  # the one decoder
        pad = dict(line.strip().split(": ") for line in specs[0].splitlines() if "memory_padding:" in line)
        device, host = int(pad["device_memory_padding"]), int(pad["host_memory_padding"])
        # DALI preallocates one device and two pinned host buffers of these sizes per thread: the
        # pipeline's budget split over them, but never less than DALI's defaults (16 MiB, 8 MiB),
        # which passing nothing would give
        assert device == max(DEVICE_PADDING_PER_PIPELINE // threads, 16 * 2**20)
        assert host == max(HOST_PADDING_PER_PIPELINE // (2 * threads), 8 * 2**20)
        if threads <= 12:
            assert threads * device <= DEVICE_PADDING_PER_PIPELINE and 2 * threads * host <= HOST_PADDING_PER_PIPELINE


def eval_reads(monkeypatch, batches):
    """Host reads (`.cpu()`, `.item()`, `.tolist()` and the dispatcher's sync ops) made by `evaluate` itself
    (the policies' checks of CPU labels read host tensors only, and are test_sync's business)."""
    import sys

    from rmix.mixing import Normalize
    from rmix.models import build
    reads = []
    for name in ("cpu", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if sys._getframe(1).f_code.co_filename.endswith("engine.py"):
                reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    torch.manual_seed(0)
    model = build("resnet8", 7)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g),
               torch.randint(0, 7, (4,), generator=g)) for _ in range(batches)]
    with SyncCounter() as counter:
        result = engine.evaluate(model, loader, Normalize((128.0,) * 3, (64.0,) * 3), None)
    monkeypatch.undo()
    assert result["images"] == 4 * batches
    return reads + [op for op, where in counter.reads if where.startswith("rmix.engine:")]


def test_evaluate_reads_back_once_per_pass_not_per_batch(monkeypatch):
    three, eight = eval_reads(monkeypatch, 3), eval_reads(monkeypatch, 8)
    assert three == eight and three.count("cpu") == 1, three
