"""Fashion-MNIST and MNIST: idx files, detection, both loaders, --train-per-class, --eval-every, the real files."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import MNIST_TEST, MNIST_TRAIN, loader_of, write_coded_cifar, write_fake_mnist, write_idx
from rmix import checkpoint
from rmix import config as C
from rmix.cli import cli
from rmix.data import detect_dataset, resolve_data
from rmix.pipelines import first_per_class, read_arrays, scan_image_folder
from rmix.pipelines.idx import DEBIAN_FASHION_MNIST, IdxError, find_idx_dir, load_mnist, read_idx

# ---- idx files ----


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    truth = write_fake_mnist(tmp_path, gz=gz)
    images, labels, classes = load_mnist(tmp_path, train=True, dataset="fashion-mnist")
    assert images.shape == (MNIST_TRAIN, 28, 28, 3) and images.dtype == np.uint8 and images.flags.c_contiguous
    assert (images == truth["train"][0][..., None]).all()  # grey replicated to RGB
    assert labels.dtype == np.int64 and (labels == truth["train"][1]).all()
    assert classes[0] == "T-shirt/top" and len(classes) == 10
    assert load_mnist(tmp_path, train=False, dataset="mnist")[0].shape == (MNIST_TEST, 28, 28, 3)


@pytest.mark.parametrize("layout", ["flat", "raw", "torchvision"])
def test_the_three_layouts(tmp_path, layout):
    where = {"flat": tmp_path, "raw": tmp_path / "raw", "torchvision": tmp_path / "FashionMNIST" / "raw"}[layout]
    write_fake_mnist(where)
    assert find_idx_dir(tmp_path, "fashion-mnist") == str(where)


def test_bad_files_are_one_line_errors_naming_the_file(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    good = path.read_bytes()
    path.write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(IdxError, match=f"{path}: not an idx file"):
        read_idx(str(path))
    path.write_bytes(good[:-100])
    with pytest.raises(IdxError, match=f"{path}: truncated"):
        read_idx(str(path))
    path.write_bytes(good)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(MNIST_TRAIN - 1, np.uint8))
    with pytest.raises(IdxError, match=f"{MNIST_TRAIN - 1} labels for the {MNIST_TRAIN} images"):
        load_mnist(tmp_path, train=True)
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_mnist(tmp_path, train=True)
    (tmp_path / "broken.gz").write_bytes(b"not gzip")
    with pytest.raises(IdxError, match="broken.gz: cannot read"):
        read_idx(str(tmp_path / "broken.gz"))


@pytest.mark.slow
def test_bad_file_through_the_cli_is_one_line(tmp_path):
    data = tmp_path / "fashion"
    write_fake_mnist(data, gz=False)
    (data / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--epochs", "1", "--model", "resnet8",
                                 "--batch-size", "8"])
    assert r.exit_code == 2 and "t10k-images-idx3-ubyte: truncated" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


# ---- detection ----

def test_detection(tmp_path):
    write_fake_mnist(tmp_path / "fashion-mnist")
    write_fake_mnist(tmp_path / "tv" / "MNIST" / "raw")
    write_fake_mnist(tmp_path / "data" / "x")
    assert detect_dataset(tmp_path / "fashion-mnist") == "fashion-mnist"
    assert detect_dataset(tmp_path / "tv") == "mnist"
    assert detect_dataset(tmp_path / "tv" / "MNIST") == "mnist"
    with pytest.raises(ValueError, match="say --dataset fashion-mnist or mnist"):
        detect_dataset(tmp_path / "data" / "x")  # the same files either way: the name must tell
    assert resolve_data(str(tmp_path / "data" / "x"), "mnist")[1] == "mnist"
    write_fake_mnist(tmp_path / "tv" / "FashionMNIST" / "raw")
    with pytest.raises(ValueError, match="both"):
        detect_dataset(tmp_path / "tv")
    assert resolve_data(str(tmp_path / "tv"), "fashion-mnist")[1] == "fashion-mnist"


def test_idx_files_read_as_folders_are_named_with_the_dataset_that_reads_them(tmp_path):
    # a checkpoint trained on image folders, evaluated on Fashion-MNIST's directory: say what is there
    write_fake_mnist(tmp_path / "fashion-mnist")
    with pytest.raises(ValueError, match=r"holds Fashion-MNIST \(idx files\), read here as --dataset folder, which "
                                         r"needs train/; --dataset fashion-mnist reads it$"):
        resolve_data(str(tmp_path / "fashion-mnist"), "folder")
    write_fake_mnist(tmp_path / "data" / "x")  # either MNIST: no kind to name, the folders are
    with pytest.raises(ValueError, match="has no train/ folder"):
        resolve_data(str(tmp_path / "data" / "x"), "imagenet")


def test_missing_folder_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr("rmix.data.DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        resolve_data("", "fashion-mnist")
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        resolve_data(str(tmp_path / "none"), "fashion-mnist")


# ---- both loaders ----

def _loader(kind, root, dataset="fashion-mnist", *, train, per_class=0, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("workers", 1 if kind == "dali" else 0)
    arrays = read_arrays(root, dataset, train=train)
    if per_class:
        arrays = arrays.subset(first_per_class(arrays.labels, per_class, arrays.classes))
    return loader_of(kind, arrays, train=train, **kw)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_val_is_the_files_unaugmented(kind, tmp_path):
    truth = write_fake_mnist(tmp_path)
    val = _loader(kind, tmp_path, train=False)
    images, labels = map(torch.cat, zip(*val))
    assert images.dtype == torch.uint8 and images.shape == (MNIST_TEST, 28, 28, 3)
    assert torch.equal(images, torch.from_numpy(truth["test"][0])[..., None].expand(-1, -1, -1, 3))
    assert labels.tolist() == truth["test"][1].tolist() and val.num_classes == 10


def _offsets(src, out):
    """(dy, dx, flipped) with out == src shifted by (dy, dx) with zero fill (and mirrored), else None."""
    padded = np.pad(src, 4)
    for flipped in (False, True):
        for dy in range(9):
            for dx in range(9):
                window = padded[dy:dy + 28, dx:dx + 28]
                if np.array_equal(window[:, ::-1] if flipped else window, out):
                    return dy - 4, dx - 4, flipped
    return None


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_train_is_pad_crop_and_flip_only_for_fashion(kind, dataset, tmp_path):
    truth = write_fake_mnist(tmp_path, seed=1)
    train = _loader(kind, tmp_path, dataset, train=True, batch_size=10, seed=3)
    found, flips = 0, 0
    for images, labels in train:
        assert images.shape[1:] == (28, 28, 3) and (images[..., 0] == images[..., 2]).all()
        for image, label in zip(images.numpy(), labels.tolist()):
            # the source: find the file image whose pixels the crop shows
            hits = [_offsets(src, image[..., 0]) for src in truth["train"][0]]
            match = [(i, h) for i, h in enumerate(hits) if h is not None]
            assert len(match) == 1
            i, (dy, dx, flipped) = match[0]
            assert -4 <= dy <= 4 and -4 <= dx <= 4 and truth["train"][1][i] == label
            found += 1
            flips += flipped
    assert found == MNIST_TRAIN
    if dataset == "mnist":
        assert flips == 0
    else:
        assert 0 < flips < MNIST_TRAIN


# ---- --train-per-class ----

def test_first_per_class_is_file_order():
    labels = [2, 0, 1, 0, 2, 1, 0, 2, 1]
    assert first_per_class(labels, 2, ["a", "b", "c"]).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="class 'a' has 3 training images, fewer than 4"):
        first_per_class(labels, 4, ["a", "b", "c"])


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_per_class_keeps_the_first_files_of_each_class(kind, tmp_path, solid_folder_3x5):
    truth = write_fake_mnist(tmp_path / "f", seed=2)
    sub = _loader(kind, tmp_path / "f", train=True, batch_size=4, per_class=2, drop_last=False)
    assert sub.num_samples == 20 and len(sub) == 5
    seen = []
    for images, _ in sub:  # which file each crop comes from
        for image in images.numpy():
            seen += [i for i, src in enumerate(truth["train"][0]) if _offsets(src, image[..., 0])]
    assert sorted(seen) == list(range(20))  # labels cycle 0..9, so the first two of each class are files 0..19
    assert _loader(kind, tmp_path / "f", train=False).num_samples == MNIST_TEST  # val untouched
    index = scan_image_folder(solid_folder_3x5)
    sub = loader_of(kind, index.subset(first_per_class(index.labels, 3, index.classes)), train=True, batch_size=2,
                    crop_size=16, val_resize=20, workers=1 if kind == "dali" else 0)
    assert sub.num_samples == 9 and sub.classes == index.classes
    (tmp_path / "c").mkdir()
    write_coded_cifar(tmp_path / "c", False)
    arrays = read_arrays(tmp_path / "c", "cifar10", train=True)
    cifar = loader_of(kind, arrays.subset(first_per_class(arrays.labels, 1, arrays.classes)), train=True,
                      batch_size=2, workers=1 if kind == "dali" else 0)
    assert cifar.num_samples == 10


# ---- --eval-every ----

@pytest.mark.slow
def test_eval_every_evaluates_those_epochs_and_the_last(tmp_path):
    data = tmp_path / "fashion-mnist"
    write_fake_mnist(data)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--epochs", "5", "--eval-every", "2",
                                 "--batch-size", "8", "--model", "resnet8", "--workers", "1", "--loader", "torch",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["val_top1"] is not None for row in rows] == [False, True, False, True, True]
    best = checkpoint.read(out / "best.pt")
    scored = {row["epoch"]: row["val_top1"] for row in rows if row["val_top1"] is not None}
    assert best["best_top1"] == max(scored.values())
    assert best["epoch"] in scored and scored[best["epoch"]] == max(scored.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["dataset"] == "fashion-mnist" and cfg["data"]["mean"][0] == pytest.approx(0.2860 * 255)


def test_option_ranges():
    with pytest.raises(ValueError, match="--eval-every"):
        C.validate(C.replace(C.TrainConfig(), eval_every=0))
    with pytest.raises(ValueError, match="--train-per-class"):
        C.validate(C.replace(C.TrainConfig(), **{"data.train_per_class": -1}))


# ---- the real files ----

def _real_files():
    if os.path.isdir(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    if os.environ.get("CI") == "true":  # .ci/run installs it: missing there is a failure
        pytest.fail(f"{DEBIAN_FASHION_MNIST} is missing: .ci/run must `apt-get install dataset-fashion-mnist`")
    pytest.skip("apt-get install dataset-fashion-mnist")


@pytest.mark.slow
def test_real_fashion_mnist_files():
    root = _real_files()
    images, labels, classes = load_mnist(root, train=True)
    assert images.shape == (60_000, 28, 28, 3) and np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels, _ = load_mnist(root, train=False)
    assert test_images.shape == (10_000, 28, 28, 3) and np.bincount(test_labels).tolist() == [1000] * 10
    mean, std = images[..., 0].mean() / 255, images[..., 0].std() / 255
    assert (round(mean, 4), round(std, 3)) == (0.2860, 0.353)  # the constants rmix normalizes with
    assert detect_dataset(__import__("pathlib").Path(root)) == "fashion-mnist"


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_train_and_eval_on_the_real_files(tmp_path, loader):
    root = _real_files()
    out = tmp_path / loader
    r = CliRunner().invoke(cli, ["train", "--dataset", "fashion-mnist", "--train-per-class", "20", "--epochs", "1",
                                 "--batch-size", "50", "--model", "resnet8", "--workers", "1", "--loader", loader,
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["data_dir"] == root and cfg["num_classes"] == 10
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(out / "best.pt"), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["images"] == 10_000 and 0 <= result["top1"] <= 100
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["top1"] == pytest.approx(row["val_top1"])


def test_show_and_data_check_on_fashion_mnist(tmp_path):
    data = tmp_path / "fashion-mnist"
    write_fake_mnist(data)
    r = CliRunner().invoke(cli, ["show", "--data-dir", str(data), "--batch", "4", "--steps", "2",
                                 "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["data", "check", str(data)])
    assert r.exit_code == 0 and f"{MNIST_TRAIN + MNIST_TEST} images" in r.output, r.output
    shutil.copy(data / "train-labels-idx1-ubyte.gz", data / "t10k-labels-idx1-ubyte.gz")
    r = CliRunner().invoke(cli, ["data", "check", str(data)])
    assert r.exit_code != 0 and "t10k-labels-idx1-ubyte.gz" in r.output


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_eval_with_another_dataset_reads_that_datasets_own_place_not_the_checkpoints_folder(jpeg_folder_4x6, tmp_path):
    # a folder checkpoint, --dataset fashion-mnist: Debian's files (their 10 classes then refused), not tiny/
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(run), "--epochs", "1",
                                 "--model", "resnet8",
                                 "--batch-size", "8", "--crop-size", "16", "--val-resize", "20", "--workers", "1",
                                 "--loader", "torch"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run / "best.pt"), "--dataset", "fashion-mnist"])
    assert r.exit_code == 2 and f"--data-dir: {DEBIAN_FASHION_MNIST} has 10 classes" in r.output, r.output
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run / "best.pt"), "--dataset", "cifar10"])
    assert r.exit_code == 2 and "--dataset: cifar10 needs --data-dir" in r.output, r.output


def test_an_image_folder_read_as_an_array_dataset_names_what_it_holds_first(jpeg_folder_4x6, tmp_path):
    # the preset says fashion-mnist; the folder is images: that is the error, not the options arrays ignore
    r = CliRunner().invoke(cli, ["train", "--preset", "cpu-fashion", "--data-dir", str(jpeg_folder_4x6),
                                 "--crop-size", "16", "--val-resize", "20", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"Error: --data-dir: {jpeg_folder_4x6.resolve()} holds an image folder (train/, val/), "
                               "read here as --dataset fashion-mnist"), r.output
    assert "--dataset folder reads it" in r.output and not (tmp_path / "r").exists()
