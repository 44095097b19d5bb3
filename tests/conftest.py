"""Fixtures shared by test modules (the data sets, one fixture each), the guard that keeps the suite
independent of its order, and the `slow` mark on every `heavy` test.

Triton's interpreter is chosen once, before anything imports triton: without CUDA the kernel tests
run through it (TRITON_INTERPRET=1), and a module that imported triton first would otherwise fix the
runtime without it ("0 active drivers") for every later test.

`process_state_is_restored` (every test) fails a test that leaves process-wide state changed: the
working directory, environment variables, torch's default dtype, thread count and determinism
switches, cuDNN's flags, signal handlers. It restores the state first, so one leak does not fail
the tests after it. Change such state with `monkeypatch`, or restore it in a `finally`.
"""
import os
import signal

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import CLASSES, GREEN, RED, SIZES, cli_train, solid_image  # noqa: E402
from rmix.pipelines.synth import synth_dataset  # noqa: E402

SIGNALS = [s for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGXFSZ)]
# set by a library for its own runtime, once per process: inductor at its first use
LIBRARY_ENV = {"PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "TORCHINDUCTOR_CACHE_DIR"}


def _state():
    import torch.utils.deterministic as det
    return {
        "cwd": os.getcwd(),
        "environ": {k: v for k, v in os.environ.items() if k not in LIBRARY_ENV},
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        # warn_only means nothing while the algorithms are off
        "deterministic_algorithms": (torch.are_deterministic_algorithms_enabled(),
                                     torch.are_deterministic_algorithms_enabled()
                                     and torch.is_deterministic_algorithms_warn_only_enabled()),
        "fill_uninitialized_memory": det.fill_uninitialized_memory,
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "signals": [signal.getsignal(s) for s in SIGNALS],
    }


def _restore(state):
    import torch.utils.deterministic as det
    os.chdir(state["cwd"])
    for k in set(os.environ) - set(state["environ"]) - LIBRARY_ENV:
        del os.environ[k]
    os.environ.update(state["environ"])
    torch.set_default_dtype(state["default_dtype"])
    torch.set_num_threads(state["num_threads"])
    torch.use_deterministic_algorithms(state["deterministic_algorithms"][0], warn_only=state["deterministic_algorithms"][1])
    det.fill_uninitialized_memory = state["fill_uninitialized_memory"]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state["cudnn"]
    for s, handler in zip(SIGNALS, state["signals"]):
        if handler is not None:
            signal.signal(s, handler)


def _changes(before, after):
    out = {}
    for key in before:
        if key == "environ":
            keys = set(before[key]) | set(after[key])
            diff = {k: (before[key].get(k), after[key].get(k)) for k in sorted(keys)
                    if before[key].get(k) != after[key].get(k)}
            if diff:
                out[key] = diff
        elif before[key] != after[key]:
            out[key] = (before[key], after[key])
    return out


@pytest.hookimpl(tryfirst=True)  # before -m deselects: `-m "not slow"` must leave the heavy tests out too
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("heavy"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def process_state_is_restored(request):
    before = _state()
    yield
    changed = _changes(before, _state())
    if changed:
        _restore(before)
        pytest.fail(f"left process-wide state changed: {changed}", pytrace=False)


# ---- data sets, one fixture each; a module that asks for one gets its own copy (scope="module")

@pytest.fixture(scope="module")
def jpeg_folder_4x6(tmp_path_factory):
    """4 classes x 6 train / 3 val JPEGs of 24 px: 3 steps per epoch at batch 8."""
    return synth_dataset(tmp_path_factory.mktemp("d") / "tiny", classes=4, train_per_class=6, val_per_class=3,
                         width=24, height=24)


@pytest.fixture(scope="module")
def jpeg_folder_10x2(tmp_path_factory):
    """10 classes x 2 train / 1 val JPEGs of 24 px: another class count than jpeg_folder_4x6's (--init-from)."""
    return synth_dataset(tmp_path_factory.mktemp("d") / "ten", classes=10, train_per_class=2, val_per_class=1,
                         width=24, height=24)


@pytest.fixture(scope="module")
def jpeg_folder_4x8(tmp_path_factory):
    """4 classes x 8 train / 3 val JPEGs of 24 px: 32 train images, 12 val images (two ranks' DDP runs)."""
    return synth_dataset(tmp_path_factory.mktemp("data") / "tiny", classes=4, train_per_class=8, val_per_class=3,
                         width=24, height=24)


@pytest.fixture(scope="module")
def jpeg_folder_4x8_val2(tmp_path_factory):
    """4 classes x 8 train / 2 val JPEGs of 24 px."""
    return synth_dataset(tmp_path_factory.mktemp("data") / "tiny", classes=4, train_per_class=8, val_per_class=2,
                         width=24, height=24)


@pytest.fixture(scope="module")
def jpeg_folder_2x8_64x48(tmp_path_factory):
    """2 classes x 8 train JPEGs of 64x48 (and 1 val each)."""
    return synth_dataset(tmp_path_factory.mktemp("bench") / "jpegs", classes=2, train_per_class=8, val_per_class=1,
                         width=64, height=48)


@pytest.fixture(scope="module")
def solid_folder_3x5(tmp_path_factory):
    """3 classes x 5 solid-colour images (helpers.CLASSES, RED, GREEN): JPEGs (one .JPG, one named with a
    space), one PNG, one in a nested folder, and a text file to ignore."""
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name / "nested")
        for i, (w, h) in enumerate(SIZES):
            image = solid_image(w, h, (RED[c], GREEN[i], 100))
            if name == "mango" and i == 4:
                image.save(root / name / f"img{i}.png")
            elif name == "mango" and i == 1:
                image.save(root / name / f"img{i} copy.jpg", quality=95)  # a space in the name
            elif name == "zebra" and i == 4:
                image.save(root / name / "nested" / f"img{i}.jpg", quality=95)
            else:
                image.save(root / name / f"img{i}.JPG" if i == 3 else root / name / f"img{i}.jpg",
                           quality=95)
    (root / "Apple" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def uninterrupted_runs(jpeg_folder_4x6, tmp_path_factory):
    """{loader: run directory} of helpers.cli_train on jpeg_folder_4x6 with each loader, without
    mid-epoch saves: saving must not change the training."""
    out = {}
    for loader in ("dali", "torch"):
        out[loader] = tmp_path_factory.mktemp("ref") / loader
        r = cli_train(jpeg_folder_4x6, out[loader], "--loader", loader)
        assert r.exit_code == 0, r.output
    return out
