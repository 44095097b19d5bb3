"""Shard sets are never silently wrong (#31): one label reader for every path, prepared sets verified
against their index.json and tars, any member name, and one-line errors naming the file."""
import collections
import hashlib
import io
import json
import random
import shutil
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import loader_of, train_args
from rmix.cli import cli
from rmix.pipelines.prepare import prepare_folder
from rmix.pipelines.wds import index_shard as wds_index
from rmix.pipelines.wds import read_dali_index, read_label, scan_shards, write_dali_index

KW = dict(batch_size=4, crop_size=16, val_resize=20, workers=1, seed=3)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, samples):
    """A shard as another WebDataset writer makes it: [(key, label bytes)], no .idx, PAX names."""
    with tarfile.open(path, "w") as tar:
        for i, (key, cls) in enumerate(samples):
            for name, blob in ((f"{key}.jpg", jpeg(i)), (f"{key}.cls", cls)):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def foreign(tmp_path, train, val):
    """A shard set without index.json: train-000000.tar and val-000000.tar of [(key, label bytes)]."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_tar(tmp_path / "train-000000.tar", train)
    write_tar(tmp_path / "val-000000.tar", val)
    return tmp_path


def hashes(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()}


def one_error(r, *names):
    """The output is one `Error:` line naming each of ``names``."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert lines[-1].startswith("Error: ") and "Traceback" not in r.output, r.output
    assert all(name in lines[-1] for name in names), r.output
    return lines[-1]


def refused(root, tmp_path, *names):
    """`rmix data check` and `rmix train` both refuse ``root`` naming ``names``; nothing written or changed."""
    before = hashes(root)
    check = one_error(CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"]), *names)
    for extra in ((), ("--no-preflight",)):
        r = CliRunner().invoke(cli, train_args(root, tmp_path / "run", "--epochs", "1", *extra))
        one_error(r, *names)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert hashes(root) == before
    return check


@pytest.fixture(scope="module")
def prepared(jpeg_folder_4x6, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "w"
    prepare_folder(str(jpeg_folder_4x6), str(out), shard_size=5,
                   say=lambda t: None)  # 24 train in 5 shards, 12 val in 3
    return out


@pytest.fixture
def copy(prepared, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(prepared, out)
    return out


# one label reader --------------------------------------------------------------------------------

@pytest.mark.slow
def test_labels_with_newlines_train_and_evaluate_the_same_under_both_loaders(tmp_path):
    # 13 classes, each .cls ending in a newline as many writers do: 12\n is 12 and 2\n is 2 on every path
    train = [(f"t{i}", f"{i % 13}\n".encode()) for i in range(16)]
    val = [(f"v{i}", f"{(i * 5) % 13}\r\n".encode()) for i in range(8)]
    root = foreign(tmp_path / "nl", train, val)
    want = [(i * 5) % 13 for i in range(8)]
    for kind in ("dali", "torch"):
        got = torch.cat([y for _, y in loader_of(kind, scan_shards(root, "val", labels=False), train=False, **KW)])
        assert got.tolist() == want, kind
    r = CliRunner().invoke(cli, train_args(root, tmp_path / "run", "--loader", "dali", "--epochs", "1"))
    assert r.exit_code == 0, r.output
    scores = []
    for kind in ("dali", "torch"):
        r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--data-dir",
                                     str(root), "--loader", kind, "--json"])
        assert r.exit_code == 0, r.output
        scores.append(json.loads([line for line in r.output.splitlines() if line.startswith("{")][-1]))
    assert scores[0]["top1"] == scores[1]["top1"] and scores[0]["images"] == 8


@pytest.mark.parametrize("text", [b"-1", b"1.0", b"one", b"", b"1 2", b"0x1"])
def test_a_label_that_is_not_a_class_number_is_refused_naming_its_member(tmp_path, text):
    train = [(f"t{i}", str(i % 2).encode()) for i in range(8)]
    train[5] = ("bad one", text)
    root = foreign(tmp_path / "set", train, [(f"v{i}", b"1") for i in range(4)])
    refused(root, tmp_path, f"{root}/train-000000.tar:bad one.jpg")


def test_a_label_outside_the_index_classes_is_refused_by_every_path(copy, tmp_path):
    split = scan_shards(copy, "train")
    s = split.samples[3]
    with open(copy / split.shards[s.shard], "r+b") as f:  # a one-byte .cls: 7 of 4 classes
        f.seek(s.cls_offset)
        f.write(b"7")
    name = split.name(3)
    assert "outside the classes [0, 4)" in refused(copy, tmp_path, name)
    for kind in ("dali", "torch"):  # the loaders themselves, as with --no-preflight
        with pytest.raises(Exception, match="outside the classes") as e:
            for _epoch in range(2):
                list(loader_of(kind, scan_shards(copy, "train", labels=False), train=True, **KW))
        assert name in str(e.value) and "\n" not in str(e.value)


def test_read_label_refuses_what_is_not_an_integer():
    for text in (b"1.5", b"1e3", b"", b" ", b"--1", b"1_0", "١".encode()):
        with pytest.raises(ValueError, match="s.tar:m: its .cls"):
            read_label(text, "s.tar:m", 10)
    with pytest.raises(ValueError, match=r"s.tar:m: its .cls says 10, outside the classes \[0, 10\)"):
        read_label(b"10\n", "s.tar:m", 10)


# a prepared set is verified ----------------------------------------------------------------------

def test_the_prepared_set_passes_and_data_check_reports_its_counts(prepared):
    r = CliRunner().invoke(cli, ["data", "check", str(prepared), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "train: 24 samples in 5 shards (as index.json records)" in r.output
    assert "val: 12 samples in 3 shards (as index.json records)" in r.output


def test_a_missing_shard_is_refused(copy, tmp_path):
    (copy / "train-000001.tar").unlink()
    (copy / "train-000001.idx").unlink()
    refused(copy, tmp_path, "missing train-000001.tar")


def test_an_extra_shard_is_refused(copy, tmp_path):
    shutil.copy(copy / "train-000004.tar", copy / "train-000005.tar")
    refused(copy, tmp_path, "not in index.json: train-000005.tar")


def test_a_preparation_without_its_index_json_is_refused(copy, tmp_path):
    (copy / "index.json").unlink()
    refused(copy, tmp_path, f"{copy}: prepare.json but no index.json")


def test_an_idx_shorter_than_its_tar_is_refused(copy, tmp_path):
    idx = copy / "train-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text(f"v1.2 {len(lines) - 2}\n" + "".join(line + "\n" for line in lines[1:-1]))
    refused(copy, tmp_path, str(idx), "holds more")


def test_a_truncated_shard_is_refused_and_not_called_zero_byte(copy, tmp_path):
    tar = copy / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:2000])
    line = refused(copy, tmp_path, f"{tar}: truncated")
    assert "zero-byte" not in line


def test_a_shard_dropped_from_the_middle_of_an_idx_is_refused(copy, tmp_path):
    idx = copy / "train-000001.idx"
    lines = idx.read_text().splitlines()
    idx.write_text(f"v1.2 {len(lines) - 2}\n" + "".join(line + "\n" for line in lines[2:]))
    refused(copy, tmp_path, str(copy / "train-000001.tar"), "holds 4 samples")


@pytest.mark.parametrize("what, text, says", [
    ("index.json", "{not json", "not readable JSON"),
    ("index.json", "[1, 2]", "expected a JSON object"),
    ("index.json", '{"format": "wds"}', "no train shard list"),
    ("train-000000.idx", "v1.2 5\njpg x 7 a.jpg cls 9 1 a.cls\n", "malformed line 2"),
    ("train-000000.idx", "v1.2 5\njpg 512 x a.jpg cls 9 1 a.cls\n", "malformed line 2"),
    ("train-000000.idx", "v2 5\n", "not a v1.2 WebDataset index"),
    ("train-000000.idx", "v1.2 2\njpg 512 7 a.jpg cls 1536 1 a.cls\n\njpg 2560 7 b.jpg cls 3584 1 b.cls\n", "line 3 is empty"),
    ("train-000000.idx", b"v1.2 1\n\xff\xfe\n", "cannot read"),
])
def test_malformed_index_files_are_one_line_naming_the_file(copy, tmp_path, what, text, says):
    path = copy / what
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(copy, tmp_path, str(path), says)


def test_a_foreign_set_is_counted_at_the_start(tmp_path):
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(8)],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    r = CliRunner().invoke(cli, train_args(root, tmp_path / "run", "--epochs", "1"))
    assert r.exit_code == 0, r.output
    assert "no index.json; train: 8 samples in 1 shards, counted from the shards" in r.output
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert "train: 8 samples in 1 shards (no index.json: counted from the shards)" in r.output


# any member name ---------------------------------------------------------------------------------

def test_names_with_spaces_and_unicode_are_prepared_read_and_named(tmp_path):
    src = tmp_path / "src"
    for split, n in (("train", 8), ("val", 4)):
        for c, cls in enumerate(("a b", "é ü")):
            (src / split / cls).mkdir(parents=True)
            for i in range(n // 2):
                (src / split / cls / f"im {i} – ½ [x]:y.jpg").write_bytes(jpeg(10 * c + i))
    out = tmp_path / "w"
    prepare_folder(str(src), str(out), shard_size=3, say=lambda t: None)
    names = {m[3] for sample in read_dali_index(str(out / "val-000000.idx")) for m in sample}
    assert "a b/im 0 – ½ [x]:y.jpg" in names  # decoded back from the .idx's percent-encoding
    r = CliRunner().invoke(cli, ["data", "check", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    want = [0, 0, 1, 1]
    for kind in ("dali", "torch"):
        got = torch.cat([y for _, y in loader_of(kind, scan_shards(out, "val", labels=False), train=False, **KW)])
        assert got.tolist() == want, kind
        r = CliRunner().invoke(cli, train_args(out, tmp_path / kind, "--loader", kind, "--epochs", "1",
                                               "--batch-size", "4"))
        assert r.exit_code == 0, r.output


# every path agrees -------------------------------------------------------------------------------

NAME_CHARS = list("abcXYZ019 _-()[]+,;=@:'!~éüß中文½–") + ["\u00a0"]
LABEL_FORMATS = ["{}", "{}\n", " {}", "{} \r\n", "\t{}\n", "0{}"]


@pytest.mark.parametrize("seed", range(4))
def test_every_path_reads_the_same_member_and_label(seed, tmp_path):
    # a random small set: member names with spaces and unicode, labels with and without whitespace
    rng = random.Random(seed)
    root = tmp_path / "prop"
    keys = []
    while len(keys) < rng.randint(6, 10):
        key = "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(1, 12))).strip()
        if key and key not in keys:
            keys.append(key)
    # a foreign set's classes are counted from its labels, which must then leave no class empty
    classes = rng.randint(2, len(keys))
    labels = [i % classes for i in range(len(keys))]
    rng.shuffle(labels)
    top = labels.index(classes - 1)
    labels[0], labels[top] = labels[top], labels[0]  # in train (the first 4) too: both count the same classes
    formats = [rng.choice(LABEL_FORMATS) for _ in keys]
    samples = [(k, f.format(v).encode()) for k, v, f in zip(keys, labels, formats)]
    foreign(root, samples[:4], samples)
    split = scan_shards(root, "val")
    truth = dict(zip(keys, labels))
    assert {s.member: s.label for s in split.samples} == {f"{k}.jpg": v for k, v in truth.items()}
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["shards"]["val"]["samples"] == len(keys)
    for kind in ("dali", "torch"):  # val reads the shard in order: position i is member i
        got = torch.cat([y for _, y in loader_of(kind, scan_shards(root, "val", labels=False), train=False, **KW)])
        assert got.tolist() == labels, kind
    from rmix.pipelines.dali import SampleLabels  # and DALI's own source info names each member
    mapping = SampleLabels(split)
    rows = [f"{root}/val-000000.tar:{s.offset}:{s.member}".encode() for s in split.samples]
    width = max(map(len, rows))
    info = np.stack([np.frombuffer(r.ljust(width, b"\0"), dtype=np.uint8) for r in rows])
    assert mapping(info).tolist() == labels


def test_a_typo_label_without_an_index_is_refused_not_a_thousand_empty_classes(tmp_path):
    # labels 0..1 and one 1000: without index.json that would be a 1001-class model
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(7)] + [("typo", b"1000")],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    for args in (["data", "check", str(root), "--threads", "1"], train_args(root, tmp_path / "run", "--epochs", "1")):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, r.output
        assert "the labels run to 1000 (train-000000.tar:typo.jpg) but 998 of the classes 0..1000" in r.output
    huge = foreign(tmp_path / "g", [(f"t{i}", b"%d" % (i % 2)) for i in range(7)] + [("big", b"100000000000000000000")],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    r = CliRunner().invoke(cli, ["data", "check", str(huge), "--threads", "1"])  # refused before any list is made
    assert r.exit_code == 2 and "the labels run to 100000000000000000000" in r.output, r.output


def test_a_shard_cut_inside_a_tar_header_is_refused_by_every_reader(tmp_path):
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(12)],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    shard = root / "train-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = [m for m in tar]
    cut = members[-4].offset + 300  # inside the header of a member near the end
    shard.write_bytes(data[:cut])
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 2 and "cut short or damaged" in r.output and "train-000000.tar" in r.output, r.output
    for kind in ("dali", "torch"):
        with pytest.raises(ValueError, match="cut short or damaged"):
            loader_of(kind, scan_shards(root, "train", labels=False), train=True, **KW)


def test_member_names_dali_cannot_read_are_refused_where_dali_reads(tmp_path):
    long = "x" * 120  # past a ustar header's 100 bytes, with no folder to split off: a PAX header
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(7)] + [(long, b"1")],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 2 and f"train-000000.tar:{long}.jpg: DALI's readers.webdataset cannot read" in r.output
    with pytest.raises(ValueError, match="cannot read this member"):
        loader_of("dali", scan_shards(root, "train", labels=False), train=True, **KW)
    assert len(loader_of("torch", scan_shards(root, "train", labels=False), train=True, **KW).batch_sampler) >= 0  # torch reads it


def test_a_typo_label_in_val_names_its_member(tmp_path):
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(8)],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(3)] + [("vtypo", b"1000")])
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 2 and "the labels run to 1000 (val-000000.tar:vtypo.jpg)" in r.output, r.output


def test_a_shard_cut_at_a_member_boundary_is_refused(tmp_path):
    # the bytes stop right after a member's data: tarfile reads the shorter shard without a word
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(12)],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    shard = root / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [m for m in tar]
    cut = members[-5].offset  # the end of the member before it: a whole number of blocks
    shard.write_bytes(shard.read_bytes()[:cut])
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 2 and "no end-of-archive blocks" in r.output and "train-000000.tar" in r.output, r.output


def test_an_empty_shard_is_refused_by_name(tmp_path):
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 2)) for i in range(8)],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    with tarfile.open(root / "train-000001.tar", "w"):
        pass  # a valid tar with no members
    for args in (["data", "check", str(root), "--threads", "1"], train_args(root, tmp_path / "run", "--epochs", "1")):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and "train-000001.tar: holds no samples" in r.output, r.output


def test_an_idx_of_another_tar_is_named_not_blamed_on_the_images(copy, tmp_path):
    # a copy of shard 0's .idx beside shard 1: the offsets point at other members
    shutil.copy(copy / "train-000000.idx", copy / "train-000001.idx")
    refused(copy, tmp_path, str(copy / "train-000001.idx"), "does not match train-000001.tar")


def test_a_val_split_lacking_a_numeric_class_counts_the_same_classes(tmp_path):
    # index-less shards: the classes are 0..the largest label of train and val together, in both splits
    root = foreign(tmp_path / "f", [(f"t{i}", b"%d" % (i % 3)) for i in range(9)],
                   [(f"v{i}", b"%d" % (i % 2)) for i in range(4)])
    assert scan_shards(root, "train").classes == scan_shards(root, "val").classes == ["0", "1", "2"]
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, train_args(root, tmp_path / "run", "--epochs", "1"))
    assert r.exit_code == 0, r.output


# what the mutation run of the shard readers found untested (#36) -------------------------------------

def write_members(path, members):
    """A tar of [(name, bytes or None for a directory)], in that order."""
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            if blob is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


def samples(n, classes=2, pad=0):
    """[(name, bytes)] of `n` samples k0..k{n-1}: an image, then its label i % classes (padded with `pad` spaces)."""
    return [m for i in range(n) for m in ((f"k{i}.jpg", jpeg(i)), (f"k{i}.cls", b"%d" % (i % classes) + b" " * pad))]


def test_a_label_written_before_its_image_is_read_with_that_image(tmp_path):
    # other writers may put .cls first: the one-read shortcut (a label just after its image) must not apply
    root = tmp_path / "clsfirst"
    root.mkdir()
    for split in ("train", "val"):
        write_members(root / f"{split}-000000.tar",
                      [m for i in range(6) for m in ((f"k{i}.cls", b"%d" % (i % 3)), (f"k{i}.jpg", jpeg(i)))])
    split = scan_shards(root, "train")
    assert [split.read_with_label(i) for i in range(6)] == [(jpeg(i), i % 3) for i in range(6)]


@pytest.mark.parametrize("where", ["first member", "last member"])
def test_an_idx_naming_another_member_at_either_end_is_refused(copy, tmp_path, where):
    # the headers of the first sample's first member and the last sample's last member are both checked
    idx = copy / "train-000001.idx"
    lines = idx.read_text().splitlines()
    row = 1 if where == "first member" else len(lines) - 1
    fields = lines[row].split()
    k = 3 if where == "first member" else len(fields) - 1
    fields[k] = fields[k].replace(".", "x.", 1)  # same size and offset, another name
    lines[row] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")
    refused(copy, tmp_path, str(idx), "does not match train-000001.tar")


def test_directories_inside_and_after_an_index_less_shard_are_not_samples(tmp_path):
    root = tmp_path / "dirs"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(6, classes=3)
        write_members(root / f"{split}-000000.tar", members[:4] + [("sub", None), ("sub/.DS_Store", b"x")] + members[4:]
                      + [("extras", None)])
    split = scan_shards(root, "train")
    assert [s.member for s in split.samples] == [f"k{i}.jpg" for i in range(6)]
    assert [s.label for s in split.samples] == [i % 3 for i in range(6)]


def test_a_prepared_set_without_its_prepare_json_is_still_read(copy):
    (copy / "prepare.json").unlink()  # index.json alone (its counts) still verifies the set
    assert len(scan_shards(copy, "train").samples) == 24 and len(scan_shards(copy, "val").samples) == 12


def test_dali_s_labels_are_read_once_per_sample(prepared, monkeypatch):
    from rmix.pipelines import wds
    from rmix.pipelines.dali import SampleLabels
    split = scan_shards(prepared, "val", labels=False)
    reads = collections.Counter()
    real = wds.ShardSplit.label
    monkeypatch.setattr(wds.ShardSplit, "label", lambda self, i: reads.update([i]) or real(self, i))
    mapping = SampleLabels(split)
    rows = [f"{prepared}/{split.shards[s.shard]}:{s.offset}:{s.member}".encode() for s in split.samples]
    info = np.stack([np.frombuffer(r.ljust(200, b"\0"), dtype=np.uint8) for r in rows])
    first, again = mapping(info), mapping(info)
    assert torch.equal(first, again) and 0 in first.tolist()  # class 0 among them: a label of 0 is kept too
    assert reads == collections.Counter(range(len(rows)))


def test_an_idx_shorter_than_its_tar_is_refused_when_its_last_member_fills_whole_blocks(tmp_path):
    # the last listed member ends on a block boundary: the next member's header is right there
    root = tmp_path / "aligned"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(4, pad=511)
        write_members(root / f"{split}-000000.tar", members)
        entries = wds_index(root / f"{split}-000000.tar")
        write_dali_index(entries[:3], str(root / f"{split}-000000.idx"))  # the last sample left out
    assert entries[2][-1][2] % 512 == 0
    refused(root, tmp_path, str(root / "train-000000.idx"), "holds more (k3.jpg at byte")


@pytest.mark.parametrize("member,key,ext", [("a.jpg", "a", "jpg"), ("c/a.jpg", "c/a", "jpg"), ("c.d/a.b.jpg", "c.d/a", "b.jpg"),
                                            ("c/abc", "c/abc", ""), ("c/.hidden", "c/", "hidden"), (".hidden", "", "hidden")])
def test_a_key_ends_at_the_first_dot_of_the_base_name(member, key, ext):
    from rmix.pipelines.wds import split_key
    assert split_key(member) == (key, ext)


def test_a_shard_cut_right_after_a_member_that_fills_whole_blocks_is_named_cut(tmp_path):
    root = tmp_path / "cut"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(3, pad=511)
        write_members(root / f"{split}-000000.tar", members)
    last = wds_index(root / "train-000000.tar")[-1][-1]
    with open(root / "train-000000.tar", "r+b") as f:
        f.truncate(last[1] + last[2])  # the tar ends where k2.cls does: no end-of-archive blocks
    refused(root, tmp_path, "train-000000.tar: cut short or damaged after k2.cls (no end-of-archive blocks")


def test_a_shard_that_is_not_an_uncompressed_tar_is_one_line(tmp_path):
    import gzip
    root = foreign(tmp_path / "gz", [(f"t{i}", b"%d" % (i % 2)) for i in range(4)], [("v0", b"0"), ("v1", b"1")])
    data = (root / "train-000000.tar").read_bytes()
    (root / "train-000000.tar").write_bytes(gzip.compress(data))  # a .tar.gz named .tar
    refused(root, tmp_path, "train-000000.tar: not a readable uncompressed tar")


@pytest.mark.parametrize("after", [("extras", None), ("sub/.DS_Store", b"x")], ids=["directory", "hidden file"])
def test_what_is_not_a_sample_after_the_last_sample_of_an_indexed_shard_is_not_more_samples(tmp_path, after):
    root = tmp_path / "indexed"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(4)
        write_members(root / f"{split}-000000.tar", members + [after])
        write_dali_index(wds_index(root / f"{split}-000000.tar"), str(root / f"{split}-000000.idx"))
    assert len(scan_shards(root, "train").samples) == 4
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 0, r.output


def test_an_idx_whose_count_disagrees_with_its_lines_names_both(copy, tmp_path):
    idx = copy / "train-000000.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("v1.2 9\n" + "".join(line + "\n" for line in lines[1:]))
    refused(copy, tmp_path, str(idx), f"says 9 samples, holds {len(lines) - 1}")


@pytest.mark.parametrize("last", [[("k3.jpg", 3), ("k3.png", 4)], [("k3.jpg", 3)]], ids=["two images", "no label"])
def test_a_sample_without_one_image_and_one_label_names_its_members(tmp_path, last):
    root = tmp_path / "nolabel"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(3)
        write_members(root / f"{split}-000000.tar", members + [(name, jpeg(seed)) for name, seed in last])
    names = ", ".join(name for name, _ in last)
    refused(root, tmp_path, f"train-000000.tar: sample 3 ({names}) needs one image (.jpg/.jpeg/.png...) and one .cls")


def test_a_shard_ending_in_one_zero_block_is_read(tmp_path):
    # the end of an archive is zero blocks; one (a "lone zero block") still ends it
    root = tmp_path / "lone"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(3)
        write_members(root / f"{split}-000000.tar", members)
        last = wds_index(root / f"{split}-000000.tar")[-1][-1]
        with open(root / f"{split}-000000.tar", "r+b") as f:
            f.truncate(-(-(last[1] + last[2]) // 512) * 512 + 512)
    assert len(scan_shards(root, "train").samples) == 3
    r = CliRunner().invoke(cli, ["data", "check", str(root), "--threads", "1"])
    assert r.exit_code == 0, r.output


def test_bytes_after_the_last_member_that_are_no_tar_header_are_named(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    for split in ("train", "val"):
        members = samples(3)
        write_members(root / f"{split}-000000.tar", members)
    last = wds_index(root / "train-000000.tar")[-1][-1]
    end = -(-(last[1] + last[2]) // 512) * 512
    with open(root / "train-000000.tar", "r+b") as f:
        f.seek(end)
        f.write(b"\xab" * 1024)  # where the end-of-archive zeros were
    refused(root, tmp_path, f"train-000000.tar: cut short or damaged after k2.cls (the bytes from {end} on are not a tar "
                            "member)")


def test_an_idx_naming_another_last_member_of_three_per_sample_is_refused(tmp_path):
    # samples of an image, a label and a .json: the last member checked is the .json, not the second
    root = tmp_path / "three"
    root.mkdir()
    for split in ("train", "val"):
        members = [m for i in range(3) for m in ((f"k{i}.jpg", jpeg(i)), (f"k{i}.cls", b"%d" % (i % 2)),
                                                  (f"k{i}.json", b"{}"))]
        write_members(root / f"{split}-000000.tar", members)
        write_dali_index(wds_index(root / f"{split}-000000.tar"), str(root / f"{split}-000000.idx"))
    idx = root / "train-000000.idx"
    idx.write_text(idx.read_text().replace("k2.json", "k2xjson"))
    refused(root, tmp_path, str(idx), "does not match train-000000.tar")


def test_blank_lines_after_an_idx_s_last_sample_are_read_as_dali_reads_them(copy):
    idx = copy / "train-000000.idx"
    idx.write_text(idx.read_text() + "\n\n")
    assert len(scan_shards(copy, "train").samples) == 24


@pytest.mark.parametrize("row", ["{root}/val-000000.tar:7:nothing.jpg", "{root}/val-000009.tar:512:k.jpg",
                                 "/elsewhere/val-000000.tar:512:k.jpg"])
def test_a_sample_dali_names_that_rmix_did_not_index_is_an_error(prepared, row):
    from rmix.pipelines.dali import SampleLabels
    text = row.format(root=prepared).encode()
    info = np.frombuffer(text.ljust(200, b"\0"), dtype=np.uint8)[None]
    with pytest.raises(RuntimeError, match="DALI read a sample rmix did not index"):
        SampleLabels(scan_shards(prepared, "val", labels=False))(info)


def test_a_prepared_set_whose_labels_were_rewritten_is_refused(copy, tmp_path):
    # every .cls of one shard rewritten to 0, same sizes: its .idx still fits, index.json's per-class counts do not
    tar = copy / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    for sample in read_dali_index(str(copy / "train-000001.idx")):
        _, off, size, _ = [m for m in sample if m[0] == "cls"][0]
        data[off:off + size] = b"0".ljust(size)
    tar.write_bytes(bytes(data))
    # where every label is read: the check (and so the preflight) and scan_shards(labels=True); the
    # loaders read labels as their samples come, so --no-preflight trains on what the labels say
    one_error(CliRunner().invoke(cli, ["data", "check", str(copy), "--threads", "1"]), "train samples of class")
    r = CliRunner().invoke(cli, train_args(copy, tmp_path / "run", "--epochs", "1"))
    one_error(r, f"{copy / 'index.json'}: records", "a .cls changed since `rmix data prepare`")
    with pytest.raises(ValueError, match="a .cls changed since"):
        scan_shards(copy, "train", labels=True)
