"""What several test modules share: `rmix train` options and runs, fake data sets, torchrun launches.

Plain functions and constants; the fixtures built from them are in conftest.py. A test module imports
from here, never from another test module (tests/test_suite_guard.py checks it). pytest's default
import mode puts tests/ on sys.path, so `from helpers import ...` works as conftest's own import does.
"""
import dataclasses
import gzip
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rmix import checkpoint
from rmix.cli import cli
from rmix.pipelines import Backend, Crop, Share, loader, scan_image_folder

ROOT = Path(__file__).resolve().parents[1]

# ---- `rmix train` options; on jpeg_folder_4x6 (conftest), 24 train images at batch 8 are 3 steps an epoch

RESNET8_16PX = ["--batch-size", "8", "--crop-size", "16", "--val-resize", "20", "--model", "resnet8", "--workers", "1"]
TWO_EPOCHS = ["--epochs", "2", *RESNET8_16PX, "--log-every", "1"]
TWO_EPOCHS_TORCH = [*TWO_EPOCHS, "--loader", "torch"]
THREE_EPOCHS = ["--epochs", "3", *RESNET8_16PX, "--log-every", "1"]


def train_args(data, out, *extra):
    return ["train", "--data-dir", str(data), "--out", str(out), *THREE_EPOCHS, *extra]


def cli_train(data, out, *extra):
    """`rmix train` with train_args, in this process."""
    return CliRunner().invoke(cli, train_args(data, out, *extra))


def rows(run_dir):
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got_dir, want_dir):
    want, got = checkpoint.read(want_dir / "latest.pt")["model"], checkpoint.read(got_dir / "latest.pt")["model"]
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    keys = ("epoch", "train_loss", "train_top1", "val_top1", "val_loss")  # img_s is a clock
    assert [[r[k] for k in keys] for r in rows(got_dir)] == [[r[k] for k in keys] for r in rows(want_dir)]


class Cut(Exception):
    pass


def cut_after_save(monkeypatch, epoch, step):
    """Make `checkpoint.save` raise Cut right after writing the checkpoint of (epoch, step); returns the real save."""
    real = checkpoint.save

    def save_then_cut(path, payload):
        real(path, payload)
        if payload["epoch"] == epoch and payload["step"] == step:
            raise Cut
    monkeypatch.setattr(checkpoint, "save", save_then_cut)
    return real


# ---- solid-colour image folders: red encodes the class, green the image within its class, so a batch
# tells which images it holds after any crop, resize or flip (conftest's solid_folder_3x5)

CLASSES = ["Apple", "mango", "zebra"]     # sorted order: uppercase first, as ImageFolder
RED = [40, 140, 240]                      # per class
GREEN = [20, 60, 100, 140, 180]           # per image within a class
SIZES = [(20, 24), (37, 23), (64, 48), (31, 31), (90, 40)]  # (W, H)
CROP, RESIZE = 16, 20


def solid_image(w, h, rgb):
    a = np.empty((h, w, 3), np.uint8)
    a[:] = rgb
    return Image.fromarray(a)


def loader_of(kind, source, **options):
    """`pipelines.loader` of ``kind`` over ``source``, its Share, Crop and Backend given by their fields' names."""
    def take(cls):
        return {f.name: options.pop(f.name) for f in dataclasses.fields(cls) if f.name in options}
    backend, crop = Backend(kind, **take(Backend)), Crop(**take(Crop))
    share = Share(source.num_samples, **take(Share))
    assert not options, f"not a loader option: {sorted(options)}"
    return loader(source, share, backend, crop)


def small_loader(kind, root, **kw):
    """`loader_of` the folder ``root`` with CROP and RESIZE, 2 DALI threads or no torch workers, unless given."""
    kw.setdefault("workers", 2 if kind == "dali" else 0)
    kw.setdefault("crop_size", CROP)
    kw.setdefault("val_resize", RESIZE)
    return loader_of(kind, scan_image_folder(root), **kw)


def read_ids(images: torch.Tensor) -> list[tuple[int, int]]:
    """(class, image) of each solid-colour image in a uint8 (N, H, W, 3) batch."""
    mean = images.float().mean(dim=(1, 2))
    cls = (mean[:, 0, None] - torch.tensor(RED)).abs().argmin(1)
    img = (mean[:, 1, None] - torch.tensor(GREEN)).abs().argmin(1)
    return list(zip(cls.tolist(), img.tolist()))


def epoch_ids(loader, crop=CROP):
    """One epoch: list of (class, image) in order; checks each batch against the contract."""
    out, batches = [], 0
    for images, labels in loader:
        batches += 1
        assert images.dtype == torch.uint8 and images.device.type == "cpu"
        assert images.is_contiguous() and images.shape[1:] == (crop, crop, 3)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        got = read_ids(images)
        assert [c for c, _ in got] == labels.tolist()  # label == class of the pixels
        out += got
    assert batches == len(loader)
    return out


# ---- CIFAR's python batch files and MNIST's idx files, small fakes

def write_coded_cifar(root, cifar100: bool):
    """Fake CIFAR files: image k is solid (k, 10 * label, 50); returns {split: (ids, labels)}."""
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir()
    num_classes = 100 if cifar100 else 10
    names = {"train": ["train"], "test": ["test"]} if cifar100 else \
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    label_key = b"fine_labels" if cifar100 else b"labels"
    per_file = {"train": 30 // len(names["train"]), "test": 11}
    out, k = {}, 0
    for split, files in names.items():
        ids, labels = [], []
        for name in files:
            n = per_file[split]
            ks = list(range(k, k + n))
            k += n
            ls = [(i * 7) % min(13, num_classes) for i in ks]  # in range; 10 * label fits a byte
            hwc = np.zeros((n, 32, 32, 3), np.uint8)
            hwc[..., 0] = np.array(ks)[:, None, None]
            hwc[..., 1] = 10 * np.array(ls)[:, None, None]
            hwc[..., 2] = 50 + 4 * np.arange(32)  # a horizontal ramp: flips show
            data = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # the official planar layout
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": data, label_key: ls}, f)
            ids += ks
            labels += ls
        out[split] = (ids, labels)
    meta_key = b"fine_label_names" if cifar100 else b"label_names"
    with open(folder / ("meta" if cifar100 else "batches.meta"), "wb") as f:
        pickle.dump({meta_key: [f"c{i}".encode() for i in range(num_classes)]}, f)
    return out


def write_random_cifar10(root, n=16):
    """CIFAR-10's files under root/cifar-10-batches-py: n random images and labels per batch file."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


MNIST_TRAIN, MNIST_TEST = 40, 12  # images in write_fake_mnist's sets


def write_idx(path, array, magic_type=0x08, gz=False):
    header = bytes([0, 0, magic_type, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(array).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def write_fake_mnist(directory, *, gz=True, seed=0):
    """Four idx files in `directory`; image i of a split holds its index in pixel (0, 0), its label in (27, 27)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for split, n, prefix in (("train", MNIST_TRAIN, "train"), ("test", MNIST_TEST, "t10k")):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        images[:, 27, 27] = labels * 20
        ext = ".gz" if gz else ""
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images, gz=gz)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels, gz=gz)
        truth[split] = (images, labels)
    return truth


# ---- processes under torchrun (tests/ddp_worker.py, tests/ddp_cli.py, `python -m rmix`)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(env=None):
    """This process's environment without a launcher's variables, one thread."""
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TORCHELASTIC")}
    environ.update(OMP_NUM_THREADS="1", **(env or {}))
    return environ


def launch(args, *, cwd, nproc=2, torchrun=(), env=None, timeout=120):
    """Run `args` under torchrun (nproc > 0) or as one plain process; returns (returncode, output)."""
    environ = launch_env(env)
    cmd = [sys.executable]
    if nproc:  # --standalone: a c10d rendezvous on a free localhost port
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *torchrun]
    p = subprocess.Popen(cmd + [str(a) for a in args], cwd=cwd, env=environ, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()  # torchrun stops its ranks on SIGTERM (they run in sessions of their own)
        try:
            out, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out = "(no output: the ranks kept the pipe open)"
        pytest.fail(f"timed out after {timeout} s:\n{out[-4000:]}")
    return p.returncode, out
