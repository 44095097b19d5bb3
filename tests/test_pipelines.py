"""Loader contract tests, run for both kinds on tiny ImageFolder trees (DALI in CPU-only mode).

Every image is a solid colour: red encodes the class, green the image within its class, so a
batch tells which images it holds after any crop, resize or flip.
"""
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CLASSES, CROP, epoch_ids, loader_of, small_loader, solid_image, write_coded_cifar
from rmix.pipelines import DecodeError, read_arrays, scan_image_folder, shard_indices

KINDS = ["dali", "torch"]


def test_scan_matches_imagefolder(solid_folder_3x5):
    from torchvision.datasets import ImageFolder
    index = scan_image_folder(solid_folder_3x5)
    reference = ImageFolder(solid_folder_3x5)
    assert index.classes == reference.classes == CLASSES
    assert [os.path.join(solid_folder_3x5, f) for f in index.files] == [p for p, _ in reference.samples]
    assert index.labels == reference.targets


@pytest.mark.parametrize("kind", KINDS)
def test_val_covers_every_image_once(kind, solid_folder_3x5):
    loader = small_loader(kind, solid_folder_3x5, train=False, batch_size=4)
    assert (loader.classes, loader.num_classes, loader.num_samples) == (CLASSES, 3, 15)
    assert len(loader) == 4
    for _ in range(2):  # a second epoch is the same, in the same order
        seen = epoch_ids(loader)
        assert seen == [(c, i) for c in range(3) for i in range(5)]


@pytest.mark.parametrize("kind", KINDS)
def test_train_full_batches_and_reshuffle(kind, solid_folder_3x5):
    loader = small_loader(kind, solid_folder_3x5, train=True, batch_size=4, seed=1)
    assert len(loader) == 3  # 15 // 4, the partial batch dropped
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert len(first) == len(set(first)) == 12
    assert len(second) == len(set(second)) == 12
    assert first != second


@pytest.mark.parametrize("kind", KINDS)
def test_train_same_seed_same_order(kind, solid_folder_3x5):
    runs = [epoch_ids(small_loader(kind, solid_folder_3x5, train=True, batch_size=4, seed=s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks(kind, solid_folder_3x5):
    val = [epoch_ids(small_loader(kind, solid_folder_3x5, train=False, batch_size=3, rank=r, world_size=2))
           for r in range(2)]
    assert Counter(val[0] + val[1]) == Counter((c, i) for c in range(3) for i in range(5))
    train = [small_loader(kind, solid_folder_3x5, train=True, batch_size=2, rank=r, world_size=2, seed=3)
             for r in range(2)]
    assert len(train[0]) == len(train[1]) == 3  # (15 // 2) // 2
    for _ in range(2):
        a, b = epoch_ids(train[0]), epoch_ids(train[1])
        assert not set(a) & set(b)  # one global permutation, disjoint shards


@pytest.mark.parametrize("kind", KINDS)
def test_val_equal_batch_counts_without_duplicates(kind, solid_folder_3x5):
    # 15 images on 2 ranks: shards of 8 and 7, so both ranks run ceil(8 / batch) batches. With
    # batch 7 the 7-image rank's second batch is empty (N=0); padding is never returned.
    for batch_size in (4, 7, 8):
        seen, sizes = [], []
        for r in range(2):
            loader = small_loader(kind, solid_folder_3x5, train=False, batch_size=batch_size, rank=r, world_size=2)
            assert len(loader) == -(-8 // batch_size)
            sizes.append([x.shape[0] for x, _ in loader])
            seen += epoch_ids(loader)
        assert sorted(seen) == [(c, i) for c in range(3) for i in range(5)]
        if batch_size == 7:
            assert sorted(sizes) == [[7, 0], [7, 1]]


@pytest.mark.parametrize("kind", KINDS)
def test_val_matches_pil_reference(kind, tmp_path):
    """torchvision: exact. DALI: its bilinear (antialiased) resize vs PIL's BILINEAR, 1 level."""
    from torchvision import transforms as T
    sizes = [(300, 200), (201, 333), (257, 255), (91, 64)]
    for k, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 9) * np.cos(yy / 13)], -1)
        os.makedirs(tmp_path / f"c{k % 2}", exist_ok=True)
        Image.fromarray(a.astype(np.uint8)).save(tmp_path / f"c{k % 2}" / f"{k}.jpg", quality=95)
    index = scan_image_folder(tmp_path)
    reference = T.Compose([T.Resize(64), T.CenterCrop(56)])
    expected = torch.stack([
        torch.from_numpy(np.array(reference(Image.open(tmp_path / f).convert("RGB"))))
        for f in index.files])
    images = torch.cat([x for x, _ in small_loader(kind, tmp_path, train=False, batch_size=3,
                                                   crop_size=56, val_resize=64)])
    diff = (images.int() - expected.int()).abs()
    if kind == "torch":
        assert diff.max() == 0
    else:
        assert diff.max() <= 2 and diff.float().mean() < 0.5, (diff.max(), diff.float().mean())


@pytest.mark.parametrize("kind", KINDS)
def test_grayscale_and_rgba_become_rgb(kind, tmp_path):
    for name in ("gray", "rgba"):
        (tmp_path / name).mkdir()
    Image.new("L", (30, 20), 90).save(tmp_path / "gray" / "a.jpg")
    Image.new("RGBA", (20, 30), (10, 200, 30, 128)).save(tmp_path / "rgba" / "b.png")
    for train in (False, True):
        images, labels = next(iter(small_loader(kind, tmp_path, train=train, batch_size=2)))
        assert images.shape == (2, CROP, CROP, 3) and labels.tolist() in ([0, 1], [1, 0])
        by_label = dict(zip(labels.tolist(), images.float().mean((1, 2))))
        assert (by_label[0] - 90).abs().max() < 3
        assert (by_label[1] - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 3


@pytest.mark.parametrize("kind", KINDS)
def test_missing_and_empty_dirs(kind, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        small_loader(kind, tmp_path / "nowhere", train=True, batch_size=2)
    (tmp_path / "flat").mkdir()
    solid_image(8, 8, (1, 2, 3)).save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="flat"):
        small_loader(kind, tmp_path / "flat", train=True, batch_size=2)
    for name in ("a", "b"):
        (tmp_path / "split" / name).mkdir(parents=True)
    solid_image(8, 8, (1, 2, 3)).save(tmp_path / "split" / "a" / "a.jpg")
    (tmp_path / "split" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"split.b"):
        small_loader(kind, tmp_path / "split", train=False, batch_size=2)


@pytest.mark.parametrize("kind", KINDS)
def test_aug_plus_recolours_whole_image(kind, solid_folder_3x5):
    loader = small_loader(kind, solid_folder_3x5, train=True, batch_size=4, aug_plus=True, seed=2)
    plain = small_loader(kind, solid_folder_3x5, train=True, batch_size=4, aug_plus=False, seed=2)
    changed = 0
    for (images, _labels), (reference, _) in zip(loader, plain):
        assert images.dtype == torch.uint8 and images.shape == reference.shape
        flat = images.float().reshape(images.shape[0], -1, 3)
        # every op is a per-image colour map: a solid image stays (nearly) solid
        assert (flat - flat.mean(1, keepdim=True)).abs().max() <= 2
        shift = images.float().mean((1, 2)) - reference.float().mean((1, 2))
        changed += int(shift.abs().max() > 3)
    assert changed > 0


def test_train_split_is_distributed_samplers():
    from torch.utils.data.distributed import DistributedSampler
    for rank in range(3):
        sampler = DistributedSampler(range(17), num_replicas=3, rank=rank, shuffle=True, seed=5,
                                     drop_last=True)
        sampler.set_epoch(2)
        mine = shard_indices(17, train=True, seed=5, epoch=2, rank=rank, world_size=3)
        assert mine == list(sampler)


def test_bad_arguments(solid_folder_3x5):
    with pytest.raises(ValueError, match="kind"):
        small_loader("tf", solid_folder_3x5, train=True, batch_size=2)
    with pytest.raises(ValueError, match="no full batch"):
        small_loader("torch", solid_folder_3x5, train=True, batch_size=8, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        small_loader("torch", solid_folder_3x5, train=True, batch_size=2, rank=2, world_size=2)


def test_dali_iter_after_break_starts_a_full_epoch(solid_folder_3x5):
    loader = small_loader("dali", solid_folder_3x5, train=True, batch_size=2, seed=5)
    next(iter(loader))  # abandon the epoch after one batch
    assert len(epoch_ids(loader)) == 2 * len(loader) == 14


def test_dali_batches_survive_later_batches(solid_folder_3x5):
    kept = [(x, x.clone()) for x, _ in small_loader("dali", solid_folder_3x5, train=True, batch_size=2)]
    assert len(kept) == 7 and all(torch.equal(x, copy) for x, copy in kept)


def test_dali_gpu_without_cuda_is_a_value_error(solid_folder_3x5):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="dali_device='gpu'"):
        small_loader("dali", solid_folder_3x5, train=True, batch_size=2, dali_device="gpu")
    small_loader("dali", solid_folder_3x5, train=True, batch_size=2, dali_device="auto")  # cpu device: CPU path
    assert not torch.cuda.is_initialized()


def test_torch_batches_do_not_depend_on_workers(solid_folder_3x5):
    a = [x for x, _ in small_loader("torch", solid_folder_3x5, train=True, batch_size=4, seed=4, workers=0)]
    b = [x for x, _ in small_loader("torch", solid_folder_3x5, train=True, batch_size=4, seed=4, workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 3


# ---- CIFAR (official python batch files, tiny fakes) ----

def _cifar_epoch(loader):
    seen = []
    for images, labels in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)
        assert images.is_contiguous() and labels.dtype == torch.int64
        centre = images[:, 16, 16].long()  # a pad-4 crop always keeps the centre inside
        assert (centre[:, 1] == 10 * labels).all()
        seen += centre[:, 0].tolist()
    return seen


@pytest.mark.parametrize("cifar100", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_cifar(kind, cifar100, tmp_path):
    truth = write_coded_cifar(tmp_path, cifar100)
    kw = dict(workers=2 if kind == "dali" else 0, seed=1)
    dataset = "cifar100" if cifar100 else "cifar10"
    val = loader_of(kind, read_arrays(tmp_path, dataset, train=False), train=False, batch_size=4, **kw)
    assert (val.num_samples, len(val), val.num_classes) == (11, 3, 100 if cifar100 else 10)
    assert val.classes[:2] == ["c0", "c1"]
    assert _cifar_epoch(val) == truth["test"][0] == _cifar_epoch(val)
    train = loader_of(kind, read_arrays(tmp_path, dataset, train=True), train=True, batch_size=4, **kw)
    assert len(train) == 7
    first, second = _cifar_epoch(train), _cifar_epoch(train)
    assert len(set(first)) == len(first) == 28 and set(first) <= set(truth["train"][0])
    assert first != second
    padded = torch.cat([x for x, _ in train])
    assert (padded[:, :4] == 0).all(-1).any()  # zero padding shows up at some border
    ranks = [loader_of(kind, read_arrays(tmp_path, dataset, train=False), train=False, batch_size=5, rank=r, world_size=2,
                                **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert sorted(_cifar_epoch(ranks[0]) + _cifar_epoch(ranks[1])) == truth["test"][0]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        loader_of(kind, read_arrays(tmp_path / "nowhere", dataset, train=True), train=True, batch_size=4, **kw)


def test_cifar_val_identical_across_kinds(tmp_path):
    write_coded_cifar(tmp_path, False)
    a, b = (torch.cat([x for x, _ in loader_of(k, read_arrays(tmp_path, "cifar10", train=False), train=False,
                                               batch_size=4)])
            for k in KINDS)
    assert torch.equal(a, b)


# ---- epoch addressing: set_epoch(e) replays epoch e exactly ----

@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """2 classes x 6 noise JPEGs of assorted sizes: crops, flips and jitter all show."""
    root = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir()
        for i in range(6):
            h, w = 24 + 7 * i, 40 - 3 * i
            noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / f"c{c}" / f"{i}.jpg", quality=90)
    return root


def run_epoch(loader):
    """One epoch as a list of (images, labels)."""
    return [(images.clone(), labels.clone()) for images, labels in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_replays_an_epoch(kind, train, textured):
    kw = dict(train=train, batch_size=5, seed=3, aug_plus=train, rank=1, world_size=2)
    run = small_loader(kind, textured, **kw)
    epochs = [run_epoch(run) for _ in range(3)]  # uninterrupted: epochs 0, 1, 2
    fresh = small_loader(kind, textured, **kw)
    fresh.set_epoch(2)
    assert same(run_epoch(fresh), epochs[2])
    assert same(run_epoch(fresh), run_epoch(run))  # both went on to epoch 3
    run.set_epoch(1)  # back, after the loader ran further
    assert same(run_epoch(run), epochs[1])
    assert len(epochs[0]) == len(run) == (1 if train else 2)  # 6 per rank
    if train:
        assert not same(epochs[0], epochs[1]) and not same(epochs[1], epochs[2])
    else:
        assert same(epochs[0], epochs[1])
    with pytest.raises(ValueError, match="epoch"):
        run.set_epoch(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_augmentation_differs_by_epoch_and_rank(kind, tmp_path):
    """Eight copies of one image: what a sample looks like is all augmentation."""
    noise = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            Image.fromarray(noise).save(tmp_path / f"c{c}" / f"{i}.jpg", quality=90)
    images = {}
    for rank in range(2):
        loader = small_loader(kind, tmp_path, train=True, batch_size=4, seed=5, rank=rank, world_size=2)
        for e in range(2):
            images[rank, e] = torch.cat([x for x, _ in loader])
    assert not torch.equal(images[0, 0], images[0, 1])
    assert not torch.equal(images[0, 0], images[1, 0])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_from_a_step_yields_the_rest_of_that_epoch(kind, train, textured):
    run = small_loader(kind, textured, train=train, batch_size=2, seed=4, aug_plus=train)
    epochs = [run_epoch(run) for _ in range(2)]
    for start in (1, 4, len(run)):
        run.set_epoch(1, start)
        assert same(run_epoch(run), epochs[1][start:])
    run.set_epoch(0, 3)
    assert same(run_epoch(run), epochs[0][3:])
    assert same(run_epoch(run), epochs[1])  # the iter() after it is the next epoch, whole
    with pytest.raises(ValueError, match="start_step"):
        run.set_epoch(0, len(run) + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_after_a_break(kind, textured):
    run = small_loader(kind, textured, train=True, batch_size=2, seed=4)
    epochs = [run_epoch(run) for _ in range(2)]
    next(iter(run))  # epoch 2, abandoned after one batch
    run.set_epoch(1)
    assert same(run_epoch(run), epochs[1])


@pytest.mark.parametrize("kind", KINDS)
def test_both_kinds_read_the_same_split(kind, solid_folder_3x5):
    # the (class, image) of every sample, epoch by epoch and rank by rank, is shard_indices'
    index = scan_image_folder(solid_folder_3x5)
    for rank in range(2):
        for train in (True, False):
            loader = small_loader(kind, solid_folder_3x5, train=train, batch_size=3, seed=6, rank=rank,
                                  world_size=2)
            for e in range(2):
                order = shard_indices(15, train=train, seed=6, epoch=e, rank=rank, world_size=2)
                want = [(index.labels[i], int(index.files[i].split("img")[1][0])) for i in order]
                assert epoch_ids(loader) == want[:len(loader) * 3]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_cifar_set_epoch_replays_an_epoch(kind, train, tmp_path):
    write_coded_cifar(tmp_path, False)
    kw = dict(train=train, batch_size=4, seed=2, workers=2 if kind == "dali" else 0)
    run = loader_of(kind, read_arrays(tmp_path, "cifar10", train=train), **kw)
    epochs = [run_epoch(run) for _ in range(3)]
    fresh = loader_of(kind, read_arrays(tmp_path, "cifar10", train=train), **kw)
    fresh.set_epoch(2)
    assert same(run_epoch(fresh), epochs[2])
    run.set_epoch(0)
    assert same(run_epoch(run), epochs[0])
    assert same(epochs[0], epochs[1]) != train


def test_dali_shuts_each_epochs_pipeline_down(solid_folder_3x5):
    from nvidia.dali import Pipeline

    def running():  # built and not shut down
        return sum(1 for ref in list(Pipeline._pipes) if ref() is not None and ref()._pipe)
    before = running()
    loader = small_loader("dali", solid_folder_3x5, train=True, batch_size=4)
    abandoned = iter(loader)
    next(abandoned)  # its generator keeps the pipeline alive; the next iter() shuts it down
    for _ in range(3):
        epoch_ids(loader)
        assert running() == before + 1
    with pytest.raises(RuntimeError, match="replaced by a later iter"):
        next(abandoned)


def test_torch_loader_needs_no_garbage_collector(solid_folder_3x5):
    """A DataLoader whose workers only the cycle collector can free waits 5 s per worker."""
    import gc
    import weakref
    gc.disable()
    try:
        loader = small_loader("torch", solid_folder_3x5, train=True, batch_size=4, workers=2)
        epoch_ids(loader)
        dataloader = weakref.ref(loader._loader)
        del loader
        assert dataloader() is None
    finally:
        gc.enable()


# ---- decode errors name the batch's files ----

CORRUPT_CASES = [("dali", 2), ("torch", 0), ("torch", 2)]  # (kind, threads: DALI's or workers)


def _truncate(path):
    """Keep the first half of a valid JPEG's bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind,threads", CORRUPT_CASES)
def test_truncated_jpeg_names_its_batch(kind, threads, train, textured, tmp_path):
    import shutil
    root = tmp_path / "data"
    shutil.copytree(textured, root)
    index = scan_image_folder(root)
    files = [os.path.join(root, f) for f in index.files]
    order = shard_indices(12, train=train, seed=2, epoch=1, rank=0, world_size=1)
    bad = files[order[4]]  # epoch 1: position 4, so batch 1 (batches of 3)
    _truncate(tmp_path / bad)
    loader = small_loader(kind, root, train=train, batch_size=3, seed=2, workers=threads)
    loader.set_epoch(1)
    with pytest.raises(DecodeError) as caught:
        for _ in loader:
            pass
    error = caught.value
    assert (error.epoch, error.step) == (1, 1)
    assert error.files == [files[i] for i in order[3:6]]
    message = str(error)
    assert "epoch 1, batch 1" in message and "\n" not in message
    assert all(f in message for f in error.files)
    assert error.bad_files == [bad]  # DALI names a sample whose scan data fails
    assert error.reason
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.epoch, copy.step, copy.files, str(copy)) == (1, 1, error.files, message)


@pytest.mark.parametrize("kind,threads", CORRUPT_CASES)
def test_header_cut_jpeg_names_its_batch(kind, threads, solid_folder_3x5, tmp_path):
    """Half of a tiny JPEG is all headers: DALI cannot say which file, so "one of"."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(solid_folder_3x5, root)
    index = scan_image_folder(root)
    bad = os.path.join(root, index.files[7])  # val: batch 1 (batches of 4)
    _truncate(tmp_path / bad)
    loader = small_loader(kind, root, train=False, batch_size=4, workers=threads)
    with pytest.raises(DecodeError) as caught:
        epoch_ids(loader)
    error = caught.value
    assert (error.epoch, error.step) == (0, 1)
    assert error.files == [os.path.join(root, f) for f in index.files[4:8]]
    assert all(f in str(error) for f in error.files) and "\n" not in str(error)
    if kind == "dali":
        assert error.bad_files == [] and "one of the 4 files of epoch 0, batch 1" in str(error)
    else:
        assert error.bad_files == [bad]


FORK_AFTER_DALI = """
import gc, sys, torch
from rmix.pipelines import Backend, Crop, Share, loader, scan_image_folder
from rmix.pipelines.torch_loader import TorchLoader

index = scan_image_folder(sys.argv[1])
dali = loader(index, Share(index.num_samples, train=True, batch_size=2), Backend("dali", 1), Crop(16, val_resize=16))
for _ in range(2):
    for _ in dali:
        pass
dali.cycle = dali  # as the traceback of an error raised mid-epoch holds a loader
del dali           # garbage now, which only a full collection frees


class Collecting(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, key):
        gc.collect()  # in the worker: frees whatever garbage the fork copied
        return torch.zeros(16, 16, 3, dtype=torch.uint8), 0


loader = TorchLoader(Collecting(), ["a"], Share(4, train=True, batch_size=2), Backend("torch", 1), 16)
print(sum(len(x) for x, _ in loader))
"""


@pytest.mark.slow
def test_torch_workers_forked_after_dali_do_not_hang(solid_folder_3x5):
    # Without the collection before the fork, the worker frees the dead DALI pipeline, whose
    # destructor waits for executor threads the fork did not copy: the epoch never ends.
    r = subprocess.run([sys.executable, "-c", FORK_AFTER_DALI, str(solid_folder_3x5)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.split()[-1] == "4", r.stderr[-2000:]


# --- the split arithmetic against torch's DistributedSampler (what the mutation run found untested) ---

@pytest.mark.parametrize("n,world", [(15, 1), (15, 2), (15, 4), (7, 3), (10, 5), (5, 5), (33, 8)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_train_indices_and_batch_counts_are_distributed_samplers(n, world, drop_last):
    from torch.utils.data import DistributedSampler

    from rmix.pipelines import train_batches
    for epoch in (0, 3):
        for rank in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=11, drop_last=drop_last)
            ref.set_epoch(epoch)
            want = list(ref)
            assert shard_indices(n, train=True, seed=11, epoch=epoch, rank=rank, world_size=world,
                                 drop_last=drop_last) == want
            for batch in (1, 2, 3):
                loader_len = len(want) // batch if drop_last else -(-len(want) // batch)  # DataLoader's
                assert train_batches(n, batch, world, drop_last) == loader_len


@pytest.mark.parametrize("n,world", [(15, 2), (7, 3), (10, 4), (5, 5)])
def test_val_indices_cover_every_image_once_and_batches_fit_the_largest_shard(n, world):
    from rmix.pipelines import val_batches
    shards = [shard_indices(n, train=False, seed=0, epoch=0, rank=r, world_size=world) for r in range(world)]
    assert sorted(sum(shards, [])) == list(range(n)) and all(s == list(range(r, n, world)) for r, s in enumerate(shards))
    for batch in (1, 2, 3):
        assert val_batches(n, batch, world) == -(-max(map(len, shards)) // batch)


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=0), "--batch-size: batch_size must be >= 1"), (dict(rank=2, world_size=2), "need 0 <= rank < world_size"),
    (dict(rank=-1), "need 0 <= rank"), (dict(world_size=0, rank=0), "need 0 <= rank"),
    (dict(num_samples=3, world_size=4, rank=0), "3 images cannot be split over 4 ranks"),
    (dict(num_samples=5, batch_size=3, world_size=2, rank=0), "give no full batch of 3")])
def test_check_sharding_refuses_what_cannot_be_split(kw, message):
    from rmix.pipelines import check_sharding
    args = {**dict(num_samples=8, train=True, batch_size=2, rank=0, world_size=1), **kw}
    with pytest.raises(ValueError, match=message):
        check_sharding(**args)
    check_sharding(num_samples=4, train=True, batch_size=2, rank=1, world_size=2)  # 2 a rank: one batch
    check_sharding(num_samples=4, train=True, batch_size=1, rank=0, world_size=4)  # as many ranks as images
    check_sharding(num_samples=5, train=True, batch_size=3, rank=0, world_size=2, drop_last=False)


def test_first_per_class_keeps_the_first_n_of_each_class_in_order_and_refuses_short_classes():
    from rmix.pipelines import first_per_class
    labels = [2, 0, 1, 0, 2, 0, 1, 2, 1]
    assert first_per_class(labels, 2, ["a", "b", "c"]).tolist() == [0, 1, 2, 3, 4, 6]
    assert first_per_class(labels, 3, ["a", "b", "c"]).tolist() == list(range(9))
    with pytest.raises(ValueError, match="b"):
        first_per_class([0, 0, 1], 2, ["a", "b"])


def test_a_class_folder_reached_through_a_link_is_scanned_and_counted(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    solid_image(20, 20, (1, 2, 3)).save(real / "x.jpg")
    (tmp_path / "root" / "a").mkdir(parents=True)
    solid_image(20, 20, (1, 2, 3)).save(tmp_path / "root" / "a" / "y.jpg")
    (tmp_path / "root" / "b").mkdir()
    (tmp_path / "root" / "b" / "linked").symlink_to(real)  # a folder linked in (datasets assembled by links)
    index = scan_image_folder(tmp_path / "root")
    assert index.files == ["a/y.jpg", "b/linked/x.jpg"] and index.labels == [0, 1]


def test_batch_counts_are_ints_and_train_drops_the_partial_batch_by_default():
    # what the mutation run's second pass left: a float count (range() of it fails) and the default
    from rmix.pipelines import train_batches, val_batches
    assert train_batches(10, 3, 1) == 3 and train_batches(10, 3, 1, drop_last=False) == 4
    for got in (train_batches(10, 3, 3, drop_last=False), train_batches(10, 3, 3), val_batches(10, 3, 3)):
        assert type(got) is int


def test_first_per_class_of_no_classes_keeps_nothing():
    from rmix.pipelines import first_per_class
    assert first_per_class([], 3, []).shape == (0,)


def test_a_dataset_root_given_as_a_split_is_refused(jpeg_folder_4x6):
    # its train/ and val/ would be read as two classes
    with pytest.raises(ValueError, match="holds train/ and val/"):
        scan_image_folder(jpeg_folder_4x6)


def test_a_negative_per_class_count_is_refused():
    from rmix.pipelines import first_per_class
    with pytest.raises(ValueError, match="--train-per-class: must be >= 1"):
        first_per_class([0, 1, 0, 1], -3, ["a", "b"])


@pytest.mark.parametrize("bad,message", [(dict(crop_size=0), "crop_size must be >= 1"),
                                         (dict(device="tpu0"), "device: 'tpu0' is not a torch device")])
def test_loader_arguments_that_cannot_work_are_named(jpeg_folder_4x6, bad, message):
    args = dict(train=True, batch_size=8, crop_size=16, val_resize=20, workers=1)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        loader_of("torch", scan_image_folder(jpeg_folder_4x6 / "train"), **args)


def test_a_dangling_link_and_a_name_that_is_not_utf8_are_named(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "a" / "broken.jpg")
    with pytest.raises(ValueError, match=r"broken.jpg: a link to .*gone.jpg, which does not exist; remove the link"):
        scan_image_folder(tmp_path)
    (tmp_path / "a" / "broken.jpg").unlink()
    (tmp_path / "b" / "x.jpg").rename(os.fsdecode(os.fsencode(str(tmp_path / "b")) + b"/x\xff.jpg"))
    with pytest.raises(ValueError, match=r"x\\xff.jpg: a file or folder name that is not UTF-8; rename it"):
        scan_image_folder(tmp_path)


@pytest.mark.parametrize("seed", [-1, 2**31, 1.5, True])
def test_a_loader_seed_out_of_range_names_seed(tmp_path, seed):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.jpg")
    for kind in ("dali", "torch"):
        with pytest.raises(ValueError, match=r"^seed: expected an integer in \[0, 2\*\*31\)"):
            loader_of(kind, scan_image_folder(tmp_path), train=True, batch_size=2, crop_size=8, val_resize=8, workers=1,
                      seed=seed)
