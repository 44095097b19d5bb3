"""The CPU train pipeline's resize stage: torch's resize of DALI's crops, on its own thread."""
import gc
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rmix.pipelines import Crop, scan_image_folder
from rmix.pipelines.dali import image_folder_pipeline, write_file_list
from rmix.pipelines.host_resize import HostResize, resize_crops

SHAPES = [(300, 260), (100, 150), (24, 24), (375, 500), (50, 400), (231, 225)]  # (H, W): down, up, equal, mixed


def _textured(h, w, seed):
    """Smooth colour fields with some noise: resize filters differ visibly on this, not on flat colour."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
    a = np.array(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
    return np.clip(a + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)


def test_resize_matches_pil_bilinear_within_one_level():
    """The torchvision loader resizes with PIL: the two loaders' crops agree to 1/255."""
    crops = [_textured(h, w, k) for k, (h, w) in enumerate(SHAPES)]
    size = 24
    out = resize_crops(crops, size)
    assert out.shape == (len(crops), size, size, 3) and out.dtype == torch.uint8 and out.is_contiguous()
    for crop, got in zip(crops, out):
        ref = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)).astype(int)
        assert np.abs(got.numpy().astype(int) - ref).max() <= 1
    assert torch.equal(out[2], torch.from_numpy(crops[2]))  # same size: unchanged


def test_resize_is_interpolate_in_place():
    """The in-place aten call is F.interpolate(antialias=True) exactly, written into the batch."""
    crops = [_textured(h, w, k) for k, (h, w) in enumerate(SHAPES)]
    out = resize_crops(crops, 32)
    for crop, got in zip(crops, out):
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float()
        ref = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
        assert (got.float() - ref.round().clamp(0, 255)).abs().max() <= 1  # uint8 kernel rounds its own way
        x8 = torch.from_numpy(crop)[None].permute(0, 3, 1, 2)
        assert torch.equal(got, F.interpolate(x8, size=(32, 32), mode="bilinear", antialias=True)[0].permute(1, 2, 0))


def test_flips_mirror_after_resize():
    crops = [_textured(h, w, k) for k, (h, w) in enumerate(SHAPES)]
    flips = [k % 2 for k in range(len(crops))]
    plain, flipped = resize_crops(crops, 20), resize_crops(crops, 20, flips)
    for k in range(len(crops)):
        assert torch.equal(flipped[k], plain[k].flip(1) if flips[k] else plain[k])
    # resize and mirror commute up to rounding: mirroring the crop first gives the same images
    first = resize_crops([np.ascontiguousarray(c[:, ::-1]) for c in crops], 20)
    assert (first.int() - plain.flip(2).int()).abs().max() <= 1


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    for c in range(2):
        os.makedirs(root / f"c{c}")
        for i in range(10):
            Image.fromarray(_textured(40 + 3 * i, 56 - 2 * i, 10 * c + i)).save(root / f"c{c}" / f"{i}.jpg")
    return scan_image_folder(str(root))


def _host_resize(index, tmp_path, num_batches=4, batch=4, seed=3):
    pipe = image_folder_pipeline(index.root, write_file_list(index, str(tmp_path / "list.txt")),
                                 crop=Crop(16, min_area=0.08, val_resize=16, aug_plus=False), train=True, dali_device="cpu",
                                 resize=False, batch_size=batch, num_threads=2, device_id=None, seed=seed)
    pipe.build()
    return HostResize(pipe, num_batches, 16)


def _threads():
    return [t for t in threading.enumerate() if t.name == "rmix-host-resize"]


def test_epoch_batches_and_skip(jpegs, tmp_path):
    full = [(b[0]["images"].clone(), b[0]["labels"].clone()) for b in _host_resize(jpegs, tmp_path)]
    assert len(full) == 4
    for images, _labels in full:
        assert images.shape == (4, 16, 16, 3) and images.dtype == torch.uint8
    assert torch.cat([lab.reshape(-1) for _, lab in full]).tolist() == jpegs.labels[:16]  # the list's order
    hr = _host_resize(jpegs, tmp_path)
    hr.start(skip=2)
    rest = list(hr)
    assert rest[:2] == [None, None]  # decoded (the random streams advance) but not resized
    for (images, labels), item in zip(full[2:], rest[2:]):
        assert torch.equal(images, item[0]["images"]) and torch.equal(labels, item[0]["labels"])
    with pytest.raises(StopIteration):
        next(hr)  # stays exhausted


def test_thread_counts_of_the_caller_are_kept(jpegs, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        hr = _host_resize(jpegs, tmp_path)
        next(hr)
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]  # the default a new thread starts with, as before
        hr.close()
    finally:
        torch.set_num_threads(before)


def test_close_and_drop_stop_the_thread(jpegs, tmp_path):
    hr = _host_resize(jpegs, tmp_path, num_batches=5)
    next(hr)
    hr.close()
    assert not _threads()
    hr = _host_resize(jpegs, tmp_path, num_batches=5)
    next(hr)  # the thread now waits on a full queue
    del hr
    gc.collect()
    deadline = time.monotonic() + 10
    while _threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _threads()


def test_pipeline_errors_reach_the_consumer(jpegs, tmp_path):
    class Broken:
        prefetch_queue_depth = 2

        def schedule_run(self):
            pass

        def outputs(self):
            raise RuntimeError("decode failed: sample #1")
    hr = HostResize(Broken(), 3, 16)
    with pytest.raises(RuntimeError, match="sample #1"):
        next(hr)
    with pytest.raises(RuntimeError, match="sample #1"):
        next(hr)  # and again: the epoch is failed, not over
    hr.close()


def test_threads_are_stopped_at_exit(jpegs, tmp_path):
    """atexit stops them: one left inside DALI while the interpreter tears DALI down aborts."""
    from rmix.pipelines import host_resize
    hr = _host_resize(jpegs, tmp_path, num_batches=5)
    next(hr)
    assert _threads()
    host_resize._stop_all()
    assert not _threads() and not host_resize._RUNNING


EXIT_MID_EPOCH = """
import sys, torch
from rmix.pipelines import Backend, Crop, Share, loader, scan_image_folder
index = scan_image_folder(sys.argv[1])
loader = loader(index, Share(index.num_samples, train=True, batch_size=2), Backend("dali", 2, device=torch.device("cpu")),
                Crop(16, val_resize=16))
next(iter(loader))
"""


@pytest.mark.slow
def test_exit_mid_epoch_is_clean(jpegs):
    for _ in range(3):
        run = subprocess.run([sys.executable, "-c", EXIT_MID_EPOCH, jpegs.root], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
