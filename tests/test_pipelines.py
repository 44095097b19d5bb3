"""Loader contract tests, run for both kinds on tiny ImageFolder trees (DALI in CPU-only mode).

Every image is a solid colour: red encodes the class, green the image within its class, so a
batch tells which images it holds after any crop, resize or flip.
"""
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import build_loader, scan_image_folder

KINDS = ["dali", "torch"]
CLASSES = ["Apple", "mango", "zebra"]     # sorted order: uppercase first, as ImageFolder
RED = [40, 140, 240]                      # per class
GREEN = [20, 60, 100, 140, 180]           # per image within a class
SIZES = [(20, 24), (37, 23), (64, 48), (31, 31), (90, 40)]  # (W, H)
CROP, RESIZE = 16, 20


def _solid(w, h, rgb):
    a = np.empty((h, w, 3), np.uint8)
    a[:] = rgb
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 5 images: JPEGs (one .JPG, one named with a space), one PNG, one in a nested
    folder, and a text file to ignore."""
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name / "nested")
        for i, (w, h) in enumerate(SIZES):
            image = _solid(w, h, (RED[c], GREEN[i], 100))
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


def make(kind, root, **kw):
    kw.setdefault("num_threads", 2 if kind == "dali" else 0)
    kw.setdefault("crop_size", CROP)
    kw.setdefault("val_resize", RESIZE)
    return build_loader(kind, root, **kw)


def ids(images: torch.Tensor) -> list[tuple[int, int]]:
    """(class, image) of each solid-colour image in a uint8 (N, H, W, 3) batch."""
    mean = images.float().mean(dim=(1, 2))
    cls = (mean[:, 0, None] - torch.tensor(RED)).abs().argmin(1)
    img = (mean[:, 1, None] - torch.tensor(GREEN)).abs().argmin(1)
    return list(zip(cls.tolist(), img.tolist()))


def epoch(loader, crop=CROP):
    """One epoch: list of (class, image) in order; checks each batch against the contract."""
    out, batches = [], 0
    for images, labels in loader:
        batches += 1
        assert images.dtype == torch.uint8 and images.device.type == "cpu"
        assert images.is_contiguous() and images.shape[1:] == (crop, crop, 3)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        got = ids(images)
        assert [c for c, _ in got] == labels.tolist()  # label == class of the pixels
        out += got
    assert batches == len(loader)
    return out


def test_scan_matches_imagefolder(folder):
    from torchvision.datasets import ImageFolder
    index = scan_image_folder(folder)
    reference = ImageFolder(folder)
    assert index.classes == reference.classes == CLASSES
    assert [os.path.join(folder, f) for f in index.files] == [p for p, _ in reference.samples]
    assert index.labels == reference.targets


@pytest.mark.parametrize("kind", KINDS)
def test_val_covers_every_image_once(kind, folder):
    loader = make(kind, folder, train=False, batch_size=4)
    assert (loader.classes, loader.num_classes, loader.num_samples) == (CLASSES, 3, 15)
    assert len(loader) == 4
    for _ in range(2):  # a second epoch is the same, in the same order
        seen = epoch(loader)
        assert seen == [(c, i) for c in range(3) for i in range(5)]


@pytest.mark.parametrize("kind", KINDS)
def test_train_full_batches_and_reshuffle(kind, folder):
    loader = make(kind, folder, train=True, batch_size=4, seed=1)
    assert len(loader) == 3  # 15 // 4, the partial batch dropped
    first, second = epoch(loader), epoch(loader)
    assert len(first) == len(set(first)) == 12
    assert len(second) == len(set(second)) == 12
    assert first != second


@pytest.mark.parametrize("kind", KINDS)
def test_train_same_seed_same_order(kind, folder):
    runs = [epoch(make(kind, folder, train=True, batch_size=4, seed=s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks(kind, folder):
    val = [epoch(make(kind, folder, train=False, batch_size=3, rank=r, world_size=2))
           for r in range(2)]
    assert Counter(val[0] + val[1]) == Counter((c, i) for c in range(3) for i in range(5))
    train = [make(kind, folder, train=True, batch_size=2, rank=r, world_size=2, seed=3)
             for r in range(2)]
    assert len(train[0]) == len(train[1]) == 3  # (15 // 2) // 2
    for _ in range(2):
        a, b = epoch(train[0]), epoch(train[1])
        assert not set(a) & set(b)  # one global permutation, disjoint shards


@pytest.mark.parametrize("kind", KINDS)
def test_val_equal_batch_counts_without_duplicates(kind, folder):
    # 15 images on 2 ranks: shards of 8 and 7, so both ranks run ceil(8 / batch) batches. With
    # batch 7 the 7-image rank's second batch is empty (N=0); padding is never returned.
    for batch_size in (4, 7, 8):
        seen, sizes = [], []
        for r in range(2):
            loader = make(kind, folder, train=False, batch_size=batch_size, rank=r, world_size=2)
            assert len(loader) == -(-8 // batch_size)
            sizes.append([x.shape[0] for x, _ in loader])
            seen += epoch(loader)
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
    images = torch.cat([x for x, _ in make(kind, tmp_path, train=False, batch_size=3,
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
        images, labels = next(iter(make(kind, tmp_path, train=train, batch_size=2)))
        assert images.shape == (2, CROP, CROP, 3) and labels.tolist() in ([0, 1], [1, 0])
        by_label = dict(zip(labels.tolist(), images.float().mean((1, 2))))
        assert (by_label[0] - 90).abs().max() < 3
        assert (by_label[1] - torch.tensor([10.0, 200.0, 30.0])).abs().max() < 3


@pytest.mark.parametrize("kind", KINDS)
def test_missing_and_empty_dirs(kind, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make(kind, tmp_path / "nowhere", train=True, batch_size=2)
    (tmp_path / "flat").mkdir()
    _solid(8, 8, (1, 2, 3)).save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="flat"):
        make(kind, tmp_path / "flat", train=True, batch_size=2)
    for name in ("a", "b"):
        (tmp_path / "split" / name).mkdir(parents=True)
    _solid(8, 8, (1, 2, 3)).save(tmp_path / "split" / "a" / "a.jpg")
    (tmp_path / "split" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"split.b"):
        make(kind, tmp_path / "split", train=False, batch_size=2)


@pytest.mark.parametrize("kind", KINDS)
def test_aug_plus_recolours_whole_image(kind, folder):
    loader = make(kind, folder, train=True, batch_size=4, aug_plus=True, seed=2)
    plain = make(kind, folder, train=True, batch_size=4, aug_plus=False, seed=2)
    changed = 0
    for (images, labels), (reference, _) in zip(loader, plain):
        assert images.dtype == torch.uint8 and images.shape == reference.shape
        flat = images.float().reshape(images.shape[0], -1, 3)
        # every op is a per-image colour map: a solid image stays (nearly) solid
        assert (flat - flat.mean(1, keepdim=True)).abs().max() <= 2
        shift = images.float().mean((1, 2)) - reference.float().mean((1, 2))
        changed += int(shift.abs().max() > 3)
    assert changed > 0


def test_train_split_is_distributed_samplers():
    from torch.utils.data.distributed import DistributedSampler
    from pipelines import shard_indices
    for rank in range(3):
        sampler = DistributedSampler(range(17), num_replicas=3, rank=rank, shuffle=True, seed=5,
                                     drop_last=True)
        sampler.set_epoch(2)
        mine = shard_indices(17, train=True, seed=5, epoch=2, rank=rank, world_size=3)
        assert mine == list(sampler)


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="kind"):
        make("tf", folder, train=True, batch_size=2)
    with pytest.raises(ValueError, match="no full batch"):
        make("torch", folder, train=True, batch_size=8, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        make("torch", folder, train=True, batch_size=2, rank=2, world_size=2)


def test_dali_iter_after_break_starts_a_full_epoch(folder):
    loader = make("dali", folder, train=True, batch_size=2, seed=5)
    next(iter(loader))  # abandon the epoch after one batch
    assert len(epoch(loader)) == 2 * len(loader) == 14


def test_dali_batches_survive_later_batches(folder):
    kept = [(x, x.clone()) for x, _ in make("dali", folder, train=True, batch_size=2)]
    assert len(kept) == 7 and all(torch.equal(x, copy) for x, copy in kept)


def test_dali_gpu_without_cuda_is_a_value_error(folder):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="dali_device='gpu'"):
        make("dali", folder, train=True, batch_size=2, dali_device="gpu")
    make("dali", folder, train=True, batch_size=2, dali_device="auto")  # cpu device: CPU path
    assert not torch.cuda.is_initialized()


def test_torch_batches_do_not_depend_on_workers(folder):
    a = [x for x, _ in make("torch", folder, train=True, batch_size=4, seed=4, num_threads=0)]
    b = [x for x, _ in make("torch", folder, train=True, batch_size=4, seed=4, num_threads=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 3


# ---- CIFAR (official python batch files, tiny fakes) ----

def _write_cifar(root, cifar100: bool):
    """Fake CIFAR files: image k is solid (k, 10 * label, 50); returns {split: (ids, labels)}."""
    import pickle
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
            ls = [(i * 7) % 13 for i in ks]
            hwc = np.zeros((n, 32, 32, 3), np.uint8)
            hwc[..., 0] = np.array(ks)[:, None, None]
            hwc[..., 1] = 10 * np.array(ls)[:, None, None]
            hwc[..., 2] = 50
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
    from pipelines import build_cifar_loader
    truth = _write_cifar(tmp_path, cifar100)
    kw = dict(cifar100=cifar100, num_threads=2 if kind == "dali" else 0, seed=1)
    val = build_cifar_loader(kind, tmp_path, train=False, batch_size=4, **kw)
    assert (val.num_samples, len(val), val.num_classes) == (11, 3, 100 if cifar100 else 10)
    assert val.classes[:2] == ["c0", "c1"]
    assert _cifar_epoch(val) == truth["test"][0] == _cifar_epoch(val)
    train = build_cifar_loader(kind, tmp_path, train=True, batch_size=4, **kw)
    assert len(train) == 7
    first, second = _cifar_epoch(train), _cifar_epoch(train)
    assert len(set(first)) == len(first) == 28 and set(first) <= set(truth["train"][0])
    assert first != second
    padded = torch.cat([x for x, _ in train])
    assert (padded[:, :4] == 0).all(-1).any()  # zero padding shows up at some border
    ranks = [build_cifar_loader(kind, tmp_path, train=False, batch_size=5, rank=r, world_size=2,
                                **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert sorted(_cifar_epoch(ranks[0]) + _cifar_epoch(ranks[1])) == truth["test"][0]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_cifar_loader(kind, tmp_path / "nowhere", train=True, batch_size=4, **kw)


def test_cifar_val_identical_across_kinds(tmp_path):
    from pipelines import build_cifar_loader
    _write_cifar(tmp_path, False)
    a, b = (torch.cat([x for x, _ in build_cifar_loader(k, tmp_path, train=False, batch_size=4)])
            for k in KINDS)
    assert torch.equal(a, b)
