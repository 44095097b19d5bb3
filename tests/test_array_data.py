"""The in-memory readers (CIFAR python batches, MNIST idx files) refuse data that is not what it claims.

Each malformed file is a one-line ValueError naming the file and what is wrong, raised when the split is
read (before training); `check_array_dataset` reads both splits for `rmix data check`.
"""
import json
import os
import pickle

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import MNIST_TEST, MNIST_TRAIN, write_coded_cifar, write_fake_mnist, write_idx
from rmix.cli import cli
from rmix.pipelines import CifarError, check_array_dataset, load_cifar
from rmix.pipelines.idx import IdxError, load_mnist

N = 20  # images per CIFAR batch file


def cifar_set(root, cifar100=False, n=N):
    """A well-formed CIFAR-10 (five train batches + test_batch) or CIFAR-100 (train + test) folder; returns it."""
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    k, key = (100, b"fine_labels") if cifar100 else (10, b"labels")
    names = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    rng = np.random.default_rng(0)
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: [i % k for i in range(n)],
                 b"batch_label": name.encode()}
        if cifar100:
            batch[b"coarse_labels"] = [i % 20 for i in range(n)]
        (folder / name).write_bytes(pickle.dumps(batch))
    meta, names_key = ("meta", b"fine_label_names") if cifar100 else ("batches.meta", b"label_names")
    (folder / meta).write_bytes(pickle.dumps({names_key: [f"c{i}".encode() for i in range(k)]}))
    return folder


def edit(path, change):
    """Unpickle a batch, let `change` alter the dict, pickle it back."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    change(batch)
    path.write_bytes(pickle.dumps(batch))


def refused(match, *args, **kw):
    """load_cifar(*args, **kw) raises a CifarError whose message matches (re.escape'd pieces in order)."""
    with pytest.raises(CifarError) as info:
        load_cifar(*args, **kw)
    text = str(info.value)
    assert "\n" not in text and text.startswith(info.value.path + ": ")
    position = 0
    for piece in match:
        found = text.find(piece, position)
        assert found >= 0, f"{piece!r} not in {text!r} (after position {position})"
        position = found + len(piece)
    return info.value


def test_a_well_formed_set_loads(tmp_path):
    cifar_set(tmp_path)
    images, labels, classes = load_cifar(tmp_path, train=True)
    assert images.shape == (5 * N, 32, 32, 3) and labels.tolist() == list(range(10)) * (N // 10) * 5
    assert classes == [f"c{i}" for i in range(10)]


# ---- 1. as many labels as images, file by file ----

def test_a_batch_with_one_label_fewer_than_images_is_refused_naming_it(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "data_batch_1", lambda b: b[b"labels"].pop())  # 20 rows, 19 labels: all later pairs shift
    error = refused([str(folder / "data_batch_1"), "20 images", "19 labels", "download the set again"],
                    tmp_path, train=True)
    assert error.path == str(folder / "data_batch_1")


def test_a_test_batch_with_more_labels_than_images_is_refused(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "test_batch", lambda b: b[b"labels"].append(3))
    refused([str(folder / "test_batch"), "20 images", "21 labels"], tmp_path, train=False)


# ---- 2. a damaged or foreign batch is one line naming it ----

def test_a_truncated_batch_is_named(tmp_path):
    folder = cifar_set(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    refused([str(path), "does not unpickle", "truncated", "download the set again"], tmp_path, train=True)


def test_a_batch_replaced_by_text_is_named(tmp_path):
    folder = cifar_set(tmp_path)
    (folder / "data_batch_4").write_text("hello, this is not a pickle\n" * 10)
    refused([str(folder / "data_batch_4"), "not a CIFAR python file"], tmp_path, train=True)


def test_a_pickle_of_something_else_is_named(tmp_path):
    folder = cifar_set(tmp_path)
    (folder / "data_batch_5").write_bytes(pickle.dumps([1, 2, 3]))
    refused([str(folder / "data_batch_5"), "holds a list, not a dict"], tmp_path, train=True)


def test_a_cifar100_batch_in_a_cifar10_folder_says_which_dataset_reads_it(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "data_batch_2", lambda b: b.update({b"fine_labels": b.pop(b"labels"), b"coarse_labels": [0] * N}))
    refused([str(folder / "data_batch_2"), "no b'labels' key", "b'coarse_labels'", "b'fine_labels'",
             "CIFAR-100 batch", "--dataset cifar100"], tmp_path, train=True)


def test_a_cifar10_batch_in_a_cifar100_folder_says_which_dataset_reads_it(tmp_path):
    folder = cifar_set(tmp_path, cifar100=True)
    edit(folder / "test", lambda b: b.update({b"labels": b.pop(b"fine_labels")}))
    refused([str(folder / "test"), "no b'fine_labels' key", "CIFAR-10 batch", "--dataset cifar10"],
            tmp_path, train=False, cifar100=True)


def test_a_batch_without_data_is_named(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "test_batch", lambda b: b.pop(b"data"))
    refused([str(folder / "test_batch"), "no b'data' key"], tmp_path, train=False)


# ---- 3. labels in [0, classes) at load, the first bad one named ----

@pytest.mark.parametrize("name, train, index, value", [("data_batch_2", True, 5, 12), ("test_batch", False, 7, -1)])
def test_a_cifar10_label_out_of_range_is_named_at_load(tmp_path, name, train, index, value):
    folder = cifar_set(tmp_path)
    edit(folder / name, lambda b: b[b"labels"].__setitem__(index, value))
    refused([str(folder / name), f"label {value} at index {index}", "[0, 10)"], tmp_path, train=train)


def test_a_cifar100_fine_label_out_of_range_is_named_at_load(tmp_path):
    folder = cifar_set(tmp_path, cifar100=True)
    edit(folder / "train", lambda b: b[b"fine_labels"].__setitem__(3, 100))
    refused([str(folder / "train"), "label 100 at index 3", "[0, 100)"], tmp_path, train=True, cifar100=True)
    assert len(load_cifar(tmp_path, train=False, cifar100=True)[2]) == 100  # the other split still reads


def test_labels_that_are_no_integers_are_refused(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "data_batch_1", lambda b: b.update({b"labels": [0.5] * N}))
    refused([str(folder / "data_batch_1"), "not a list of class indices"], tmp_path, train=True)


def test_mnist_label_out_of_range_is_named_at_load(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    labels = np.arange(MNIST_TEST, dtype=np.uint8) % 10
    labels[4] = 10
    write_idx(path, labels)
    with pytest.raises(IdxError, match=rf"^{path}: label 10 at index 4 is outside \[0, 10\)"):
        load_mnist(tmp_path, train=False, dataset="mnist")


# ---- 4. rows of 3 x 32 x 32 uint8 ----

def test_rows_of_the_wrong_width_are_named(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "data_batch_1", lambda b: b.update({b"data": np.ascontiguousarray(b[b"data"][:, :3000])}))
    refused([str(folder / "data_batch_1"), "3000 bytes wide", "expected 3072"], tmp_path, train=True)


@pytest.mark.parametrize("data", [np.zeros((N, 3072), np.int64), np.zeros(N * 3072, np.uint8),
                                  [[0] * 3072] * N])
def test_data_other_than_uint8_rows_is_refused(tmp_path, data):
    folder = cifar_set(tmp_path)
    edit(folder / "test_batch", lambda b: b.update({b"data": data}))
    refused([str(folder / "test_batch"), "b'data' is", "expected uint8 rows (N, 3072)"], tmp_path, train=False)


def test_a_meta_file_naming_another_number_of_classes_is_refused(tmp_path):
    folder = cifar_set(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 9}))
    refused([str(folder / "batches.meta"), "9 class names", "CIFAR-10 has 10"], tmp_path, train=False)
    (folder / "batches.meta").write_bytes(b"garbage")
    refused([str(folder / "batches.meta"), "does not unpickle"], tmp_path, train=False)


# ---- 5. idx files: the magic checked before any dimension is read; images and labels agree ----

def test_a_labels_file_with_a_wrong_magic_byte_says_so_before_reading_dimensions(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 0x09  # the probe's damage: the label bytes after the count were read as 8 more dimensions
    path.write_bytes(bytes(raw))
    with pytest.raises(IdxError, match=rf"^{path}: not an idx labels file: bad magic number 00000809") as info:
        load_mnist(tmp_path, train=True)
    assert "truncated" not in str(info.value) and "header says" not in str(info.value)


def test_an_images_file_with_the_labels_magic_is_refused(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros(MNIST_TEST, np.uint8))  # a valid idx file, but of labels
    with pytest.raises(IdxError, match=rf"^{path}: not an idx images file: bad magic number 00000801.*expected "
                                       "00000803"):
        load_mnist(tmp_path, train=False)


def test_images_of_another_size_are_refused(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((MNIST_TRAIN, 32, 32), np.uint8))
    with pytest.raises(IdxError, match=rf"^{path}: images of 32x32 pixels, fashion-mnist has 28x28"):
        load_mnist(tmp_path, train=True)


def test_images_and_labels_of_different_counts_name_both_files(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(MNIST_TEST + 1, np.uint8))
    with pytest.raises(IdxError) as info:
        load_mnist(tmp_path, train=False)
    assert str(info.value).startswith(f"{tmp_path / 't10k-labels-idx1-ubyte'}: {MNIST_TEST + 1} labels "
                                      f"for the {MNIST_TEST} images of {tmp_path / 't10k-images-idx3-ubyte'}")


# ---- through the CLI: one line, exit 2, before any training ----

def _damage(kind, root):
    if kind == "cifar-count":
        edit(cifar_set(root) / "data_batch_1", lambda b: b[b"labels"].pop())
        return root / "cifar-10-batches-py" / "data_batch_1", "19 labels"
    if kind == "cifar-truncated":
        path = cifar_set(root) / "data_batch_3"
        path.write_bytes(path.read_bytes()[:500])
        return path, "does not unpickle"
    if kind == "cifar-label":
        edit(cifar_set(root) / "test_batch", lambda b: b[b"labels"].__setitem__(7, -1))
        return root / "cifar-10-batches-py" / "test_batch", "label -1 at index 7"
    write_fake_mnist(root / "fashion-mnist", gz=False)
    path = root / "fashion-mnist" / "train-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 0x09
    path.write_bytes(bytes(raw))
    return path, "bad magic number"


@pytest.mark.parametrize("kind", ["cifar-count", "cifar-truncated", "cifar-label", "mnist-magic"])
def test_train_on_a_damaged_set_is_one_line_naming_the_file(tmp_path, kind):
    path, what = _damage(kind, tmp_path / "data")
    data = tmp_path / "data" / ("fashion-mnist" if kind == "mnist-magic" else "")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--epochs", "1", "--model", "resnet8",
                                 "--batch-size", "8", "--out", str(out)])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith(f"Error: {path}: ") and what in lines[0]
    assert not (out / "metrics.jsonl").exists()  # refused before any epoch


# ---- 6. check_array_dataset: both splits, all checks, counts ----

@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_check_counts_a_good_cifar_set(tmp_path, dataset):
    cifar_set(tmp_path, cifar100=dataset == "cifar100")
    train = N if dataset == "cifar100" else 5 * N
    assert check_array_dataset(tmp_path, dataset) == {"ok": train + N, "bad": [], "classes": 10 if dataset ==
                                                      "cifar10" else 100, "splits": {"train": train, "test": N}}


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_check_counts_a_good_mnist_set(tmp_path, dataset):
    write_fake_mnist(tmp_path)
    assert check_array_dataset(tmp_path, dataset) == {"ok": MNIST_TRAIN + MNIST_TEST, "bad": [], "classes": 10,
                                                      "splits": {"train": MNIST_TRAIN, "test": MNIST_TEST}}


def test_check_lists_each_bad_file_and_counts_the_good_split(tmp_path):
    folder = cifar_set(tmp_path)
    edit(folder / "test_batch", lambda b: b[b"labels"].__setitem__(2, 10))
    result = check_array_dataset(tmp_path / "cifar-10-batches-py", "cifar10")
    assert result["ok"] == 5 * N and result["splits"] == {"train": 5 * N} and result["classes"] == 10
    assert result["bad"] == [{"path": str(folder / "test_batch"), "reason": result["bad"][0]["reason"]}]
    assert result["bad"][0]["reason"].startswith("label 10 at index 2 is outside [0, 10)")
    write_fake_mnist(tmp_path / "m", gz=False)
    (tmp_path / "m" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 5)
    result = check_array_dataset(tmp_path / "m", "mnist")
    assert result["splits"] == {"test": MNIST_TEST} and result["bad"][0]["path"] == os.path.join(
        tmp_path / "m", "train-images-idx3-ubyte") and result["bad"][0]["reason"].startswith("truncated")


def test_check_refuses_an_unknown_dataset_and_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="expected cifar10, cifar100, fashion-mnist or mnist, got 'folder'"):
        check_array_dataset(tmp_path, "folder")
    folder = cifar_set(tmp_path)
    os.remove(folder / "data_batch_5")
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        check_array_dataset(tmp_path, "cifar10")


def test_data_check_reads_a_cifar_set_as_cifar_and_names_a_bad_batch(tmp_path):
    # `rmix data check` treated a CIFAR folder as an image folder ("class folder has no image files")
    write_coded_cifar(tmp_path, False)
    r = CliRunner().invoke(cli, ["data", "check", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output)
    assert result["bad"] == [] and result["classes"] == 10 and result["ok"] == sum(result["splits"].values()) > 0
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"labels"] = d[b"labels"][:-1]
    batch.write_bytes(pickle.dumps(d))
    r = CliRunner().invoke(cli, ["data", "check", str(tmp_path)])
    assert r.exit_code == 1 and f"{batch}: " in r.output and "labels would pair up wrongly" in r.output, r.output
    test = result["splits"]["test"]
    assert f"{test} images read (test {test}), 1 damaged file(s), 10 classes" in r.output, r.output
    assert f"Error: 1 damaged file(s): {batch} (" in r.output and "unreadable image" not in r.output


def test_cifar100_files_read_as_cifar10_name_the_dataset_that_reads_them(tmp_path):
    write_coded_cifar(tmp_path, True)
    with pytest.raises(FileNotFoundError, match=r"holds the other CIFAR's files \(train, test\): --dataset cifar100"):
        load_cifar(tmp_path / "cifar-100-python", train=True, cifar100=False)
