"""`rmix data prepare`: ImageNet's three archives (tiny, in the real formats) and any ImageFolder,
to an ImageFolder or WebDataset shards; labels, contents, resumability, and one-line errors."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

from helpers import ROOT
from imagenet_archives import LEAVES, write_archives
from rmix.cli import cli
from rmix.pipelines import prepare as P
from rmix.pipelines.wds import index_shard, read_dali_index, scan_shards


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("archives")
    truth = write_archives(root)
    return root, truth


def invoke(*args):
    return CliRunner().invoke(cli, ["data", "prepare", *map(str, args)])


def archived_bytes(root):
    """{relative ImageFolder path: bytes} straight from the archives, by the test's own ground truth."""
    out = {}
    with tarfile.open(root / "ILSVRC2012_img_train.tar") as outer:
        for m in outer:
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for j in inner:
                    out[f"train/{m.name[:-4]}/{j.name}"] = inner.extractfile(j).read()
    return out


@pytest.mark.slow
def test_archives_to_an_image_folder_with_the_ground_truth_labels(archives, tmp_path):
    root, truth = archives
    r = invoke("imagenet", "--archives", root, "--out", tmp_path / "in", "--skip-md5")
    assert r.exit_code == 0, r.output
    out = tmp_path / "in"
    assert sorted(p.name for p in (out / "train").iterdir()) == LEAVES == sorted(p.name for p in (out / "val").iterdir())
    for wnid, names in truth["train"].items():
        assert sorted(p.name for p in (out / "train" / wnid).iterdir()) == sorted(names)
    for name, wnid in truth["val"]:  # the devkit's ground truth, by ILSVRC2012_ID (not wnid order)
        assert (out / "val" / wnid / name).is_file()
    assert sum(1 for _ in (out / "val").glob("*/*")) == len(truth["val"])
    for rel, data in archived_bytes(root).items():
        assert (out / rel).read_bytes() == data
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == LEAVES and index["names"][0] == "alpha"
    assert index["counts"] == {"train": 15, "val": 7} and not (out / ".prepare").exists()


def test_the_folder_matches_torchvisions_own_imagenet(archives, tmp_path):
    # torchvision's parsers extract the same archives (their md5 check given these archives' own)
    from torchvision.datasets import ImageNet, imagenet
    root, _ = archives
    tv = tmp_path / "tv"
    tv.mkdir()
    for f in root.iterdir():
        os.symlink(f, tv / f.name)
    md5 = {k: (name, P.md5sum(root / name)) for k, (name, _) in imagenet.ARCHIVE_META.items()}
    with mock.patch.dict(imagenet.ARCHIVE_META, md5):
        sets = {s: ImageNet(str(tv), split=s) for s in ("train", "val")}
    assert invoke("imagenet", "--archives", root, "--out", tmp_path / "in", "--skip-md5").exit_code == 0
    for split, ds in sets.items():
        ours = sorted((str(q.relative_to(tmp_path / "in" / split)), q.parent.name)
                      for q in (tmp_path / "in" / split).glob("*/*"))
        theirs = sorted((str(Path(p).relative_to(tv / split)), ds.wnids[t]) for p, t in ds.samples)
        assert ours == theirs
        assert ds.wnids == LEAVES


def test_archives_to_shards_hold_every_image_once_with_its_label(archives, tmp_path):
    root, truth = archives
    r = invoke("imagenet", "--archives", root, "--out", tmp_path / "w", "--format", "wds", "--shard-size", "4",
               "--skip-md5")
    assert r.exit_code == 0, r.output
    out = tmp_path / "w"
    assert sorted(p.name for p in out.glob("train-*.tar")) == [f"train-{k:06d}.tar" for k in range(4)]  # 15 / 4
    data = archived_bytes(root)
    train = scan_shards(out, "train")
    got = {f"train/{s.member.rsplit('.', 1)[0]}.JPEG": (train.read(i), train.classes[s.label])
           for i, s in enumerate(train.samples)}
    assert {k: v[0] for k, v in got.items()} == data  # every train JPEG, once, byte for byte
    assert all(k.split("/")[1] == wnid for k, (_, wnid) in got.items())
    assert [s.member.split("/")[0] for s in train.samples] != sorted(s.member.split("/")[0] for s in train.samples)
    val = scan_shards(out, "val")
    assert [(s.member.split("/")[1].replace(".jpg", ".JPEG"), val.classes[s.label]) for s in val.samples] == \
        truth["val"]  # file order, the ground truth's labels
    for shard in out.glob("*.tar"):  # our index is what DALI's own indexer reads from the tar
        assert read_dali_index(str(shard)[:-4] + ".idx") == index_shard(str(shard))


@pytest.mark.slow
def test_a_killed_preparation_leaves_nothing_complete_looking_and_continues(archives, tmp_path):
    root, _ = archives
    out = tmp_path / "w"
    # a process killed (SIGKILL) while writing its third shard
    script = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); from rmix.pipelines import prepare as P\n"
              "n = [0]; real = P._range_reader\n"
              "def reader(*a):\n"
              "    read = real(*a)\n"
              "    def r():\n"
              "        n[0] += 1\n"
              "        if n[0] == 10: os.kill(os.getpid(), signal.SIGKILL)\n"
              "        return read()\n"
              "    return r\n"
              "P._range_reader = reader\n"
              f"P.prepare_imagenet({str(root)!r}, {str(out)!r}, fmt='wds', shard_size=4, skip_md5=True)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert sorted(x.name for x in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert (out / "train-000002.tar.partial").exists() and not (out / "index.json").exists()
    before = {x.name: x.stat().st_mtime_ns for x in out.glob("*.tar")}
    r = invoke("imagenet", "--archives", root, "--out", out, "--format", "wds", "--shard-size", "4", "--skip-md5")
    assert r.exit_code == 0, r.output
    assert {x.name: x.stat().st_mtime_ns for x in out.glob("train-00000[01].tar")} == before  # kept, not rewritten
    assert not list(out.glob("*.partial"))
    fresh = tmp_path / "fresh"
    assert invoke("imagenet", "--archives", root, "--out", fresh, "--format", "wds", "--shard-size", "4",
                  "--skip-md5").exit_code == 0
    for x in fresh.glob("*.tar"):
        assert (out / x.name).read_bytes() == x.read_bytes()  # the same shards as an uninterrupted run
    again = invoke("imagenet", "--archives", root, "--out", out, "--format", "wds", "--shard-size", "4", "--skip-md5")
    assert again.exit_code == 0 and "already prepared" in again.output


def test_a_folder_preparation_cut_midway_keeps_its_complete_classes(archives, tmp_path):
    root, _ = archives
    out = tmp_path / "in"
    real, n = P._range_reader, [0]

    def reader(*a):
        read = real(*a)

        def r():
            n[0] += 1
            if n[0] == 7:  # inside the second class
                raise KeyboardInterrupt
            return read()
        return r
    with mock.patch.object(P, "_range_reader", reader), pytest.raises(KeyboardInterrupt):
        P.prepare_imagenet(str(root), str(out), skip_md5=True, say=lambda t: None)
    assert [p.name for p in (out / "train").iterdir() if not p.name.endswith(".partial")] == [LEAVES[0]]
    assert invoke("imagenet", "--archives", root, "--out", out, "--skip-md5").exit_code == 0
    assert sum(1 for _ in out.glob("train/*/*")) == 15 and not list(out.glob("*/*.partial"))


def _broken(tmp_path, archives, name, data=None, **kw):
    root = tmp_path / "a"
    if kw:
        write_archives(root, **kw)
    else:
        root.mkdir()
        for f in archives[0].iterdir():
            os.symlink(f, root / f.name)
    if name is not None:
        (root / name).unlink()
        if data is not None:
            (root / name).write_bytes(data)
    return root


def _train_tar_with_a_loose_jpeg():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("n01000001_1.JPEG")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return out.getvalue()


@pytest.mark.parametrize("case,needle", [
    ("no-train", "has no ILSVRC2012_img_train.tar"),
    ("no-devkit", "has no ILSVRC2012_devkit_t12.tar.gz"),
    ("md5", "md5 "),
    ("devkit-garbage", "ILSVRC2012_devkit_t12.tar.gz: not a readable ImageNet devkit"),
    ("devkit-no-meta", "ILSVRC2012_devkit_t12.tar.gz: not a readable ImageNet devkit"),
    ("train-truncated", "ILSVRC2012_img_train.tar: "),
    ("train-loose", "ILSVRC2012_img_train.tar: member n01000001_1.JPEG is not a <wnid>.tar"),
    ("val-short", "ILSVRC2012_img_val.tar: holds 6 images, the devkit's ground truth labels 7"),
])
def test_each_missing_or_broken_archive_is_one_line_naming_it(archives, tmp_path, case, needle):
    train = archives[0] / "ILSVRC2012_img_train.tar"
    root = {
        "no-train": lambda: _broken(tmp_path, archives, "ILSVRC2012_img_train.tar"),
        "no-devkit": lambda: _broken(tmp_path, archives, "ILSVRC2012_devkit_t12.tar.gz"),
        "md5": lambda: _broken(tmp_path, archives, None),
        "devkit-garbage": lambda: _broken(tmp_path, archives, "ILSVRC2012_devkit_t12.tar.gz", b"not a tarball" * 9),
        "devkit-no-meta": lambda: _broken(tmp_path, archives, None, meta=False),
        "train-truncated": lambda: _broken(tmp_path, archives, "ILSVRC2012_img_train.tar",
                                           train.read_bytes()[:train.stat().st_size // 2 + 300]),
        "train-loose": lambda: _broken(tmp_path, archives, "ILSVRC2012_img_train.tar", _train_tar_with_a_loose_jpeg()),
        "val-short": lambda: _broken(tmp_path, archives, None, val_ids=(3, 1, 2, 1, 3, 2)) and
        _shorten_truth(tmp_path / "a"),
    }[case]()
    extra = [] if case == "md5" else ["--skip-md5"]
    r = invoke("imagenet", "--archives", root, "--out", tmp_path / "out", *extra)
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]  # besides progress lines
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output


def _shorten_truth(root):
    """A devkit labelling 7 val images beside a val archive of 6."""
    import imagenet_archives as A
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        A._add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", A.meta_mat())
        A._add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", b"3\n1\n2\n1\n3\n2\n2\n")
    return root


def test_out_is_checked_before_anything_is_written(archives, tmp_path):
    root, _ = archives
    (tmp_path / "file").write_text("x")
    r = invoke("imagenet", "--archives", root, "--out", tmp_path / "file", "--skip-md5")
    assert r.exit_code == 2 and "is a file" in r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = invoke("imagenet", "--archives", root, "--out", other, "--skip-md5")
    assert r.exit_code == 2 and "not empty" in r.output and sorted(os.listdir(other)) == ["notes.txt"]
    assert invoke("imagenet", "--archives", root, "--out", tmp_path / "w", "--format", "wds",
                  "--skip-md5").exit_code == 0
    r = invoke("imagenet", "--archives", root, "--out", tmp_path / "w", "--format", "wds", "--shard-size", "3",
               "--skip-md5")
    assert r.exit_code == 2 and "shard_size 1000 -> 3" in r.output
    with mock.patch("shutil.disk_usage", return_value=mock.Mock(free=1000)):
        r = invoke("imagenet", "--archives", root, "--out", tmp_path / "full", "--skip-md5")
    assert r.exit_code == 2 and "GB free" in r.output and not (tmp_path / "full" / "train").exists()


def test_the_md5s_are_torchvisions_and_a_verified_archive_is_not_read_again(archives, tmp_path, monkeypatch):
    from torchvision.datasets import imagenet
    root, _ = archives
    paths = P.archive_paths(str(root))
    own = {k: (name, P.md5sum(paths[k])) for k, (name, _) in imagenet.ARCHIVE_META.items()}
    reads = []
    monkeypatch.setattr(P, "md5sum", lambda path, progress=None: reads.append(path) or own[
        next(k for k in paths if paths[k] == path)][1])
    with mock.patch.dict(imagenet.ARCHIVE_META, own):  # as if these were the published archives
        P.verify_archives(paths, str(tmp_path), say=lambda t: None)
        P.verify_archives(paths, str(tmp_path), say=lambda t: None)
    assert len(reads) == 3  # the second call trusted the first one's record (size and mtime)


def test_any_image_folder_to_shards_and_back(jpeg_folder_4x6, tmp_path):
    r = invoke("folder", "--src", jpeg_folder_4x6, "--out", tmp_path / "w", "--shard-size", "5")
    assert r.exit_code == 0, r.output
    train, val = scan_shards(tmp_path / "w", "train"), scan_shards(tmp_path / "w", "val")
    assert len(train.samples) == 24 and len(val.samples) == 12 \
        and train.classes == sorted(os.listdir(jpeg_folder_4x6 / "train"))
    files = {f"{p.parent.name}/{p.stem}": p.read_bytes() for p in (jpeg_folder_4x6 / "train").glob("*/*")}
    assert {s.member.rsplit(".", 1)[0]: train.read(i) for i, s in enumerate(train.samples)} == files
    assert all(train.classes[s.label] == s.member.split("/")[0] for s in train.samples)
    r = invoke("folder", "--src", tmp_path / "nothing", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "is not a directory" in r.output


def test_a_disk_error_midway_is_one_line_and_the_rerun_continues(archives, tmp_path, monkeypatch):
    import errno

    from rmix.pipelines import wds
    root, _ = archives
    out = tmp_path / "w"
    real, n = wds.ShardWriter.add, [0]

    def add(self, *a):  # the disk fills while the second shard is written
        n[0] += 1
        if n[0] == 6:
            raise OSError(errno.ENOSPC, "No space left on device", self._tmp)
        return real(self, *a)
    monkeypatch.setattr(wds.ShardWriter, "add", add)
    args = ("imagenet", "--archives", root, "--out", out, "--format", "wds", "--shard-size", "4", "--skip-md5")
    r = invoke(*args)
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and "No space left on device" in errors[0]
    assert "continues where it stopped" in errors[0] and "Traceback" not in r.output
    assert [x.name for x in out.glob("*.tar")] == ["train-000000.tar"] and not list(out.glob("*.partial"))
    monkeypatch.setattr(wds.ShardWriter, "add", real)
    assert invoke(*args).exit_code == 0 and (out / "index.json").is_file()


# Never corrupts its source, never leaves --out, never half-mixes (#31) --------------------------------


def tree(root, skip=None):
    """{path under root: sha256, "dir" or "-> link target"} of everything under ``root`` but ``skip``."""
    import hashlib
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if skip is None or Path(dirpath, d) != Path(skip)]
        for name in dirs + files:
            p = Path(dirpath, name)
            out[str(p.relative_to(root))] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir()
                                             else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def the_error(r):
    """The refused command's one `Error:` line (besides progress lines)."""
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def image_folder(root, files):
    """``files`` (paths under ``root``), each a distinct small JPEG; returns root."""
    from imagenet_archives import jpeg
    for k, rel in enumerate(files):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg(k))
    return root


SMALL = ["train/c0/x.jpg", "train/c0/y.jpg", "train/c1/z.jpg", "val/c0/v.jpg", "val/c1/w.jpg"]


@pytest.mark.parametrize("skip_md5", [True, False])
@pytest.mark.parametrize("kind", ["parent", "absolute", "link"])
def test_a_devkit_member_outside_its_folder_is_refused_by_name(tmp_path, monkeypatch, kind, skip_md5):
    import tempfile

    from torchvision.datasets import imagenet

    from imagenet_archives import symlink
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where torchvision's parser extracted to
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    member, extra = {  # each would overwrite the victim, extracted without a filter
        "parent": ("../../victim.txt", [("../../victim.txt", b"overwritten")]),
        "absolute": (str(victim), [(str(victim), b"overwritten")]),
        "link": ("ILSVRC2012_devkit_t12/evil", [(symlink("ILSVRC2012_devkit_t12/evil", str(victim)), None),
                                                 ("ILSVRC2012_devkit_t12/evil", b"overwritten")]),
    }[kind]
    root = tmp_path / "a"
    write_archives(root, devkit_extra=extra)
    own = {k: (name, P.md5sum(root / name)) for k, (name, _) in imagenet.ARCHIVE_META.items()}
    before = tree(tmp_path)
    with mock.patch.dict(imagenet.ARCHIVE_META, own):  # as if these were the published archives
        r = invoke("imagenet", "--archives", root, "--out", tmp_path / "out", *["--skip-md5"] * skip_md5)
    error = the_error(r)
    assert f"ILSVRC2012_devkit_t12.tar.gz: member {member} " in error and error.endswith("refused")
    assert victim.read_text() == "mine" and tree(tmp_path, skip=tmp_path / "out") == before


def test_the_devkit_is_extracted_inside_out(archives, tmp_path, monkeypatch):
    import tempfile
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    seen = []
    real = P.extract_devkit
    monkeypatch.setattr(P, "extract_devkit", lambda path, to: seen.append(to) or real(path, to))
    assert invoke("imagenet", "--archives", archives[0], "--out", tmp_path / "out", "--skip-md5").exit_code == 0
    assert len(seen) == 1 and Path(seen[0]).is_relative_to(tmp_path / "out") and not os.listdir(tmp_path / "tmp")


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_archive_image_names_cannot_leave_their_class_folder(tmp_path, fmt):
    root = tmp_path / "a"
    truth = write_archives(root, rename=lambda name: f"sub/../../../{name}")
    before = tree(tmp_path)
    r = invoke("imagenet", "--archives", root, "--out", tmp_path / "out", "--format", fmt, "--skip-md5")
    assert r.exit_code == 0, r.output
    assert tree(tmp_path, skip=tmp_path / "out") == before
    want = sorted(f"{w}/{os.path.basename(n)}" for w, names in truth["train"].items() for n in names)
    if fmt == "folder":
        train = tmp_path / "out" / "train"
        assert sorted(str(p.relative_to(train)) for p in train.rglob("*") if p.is_file()) == want
    else:
        members = [s.member for s in scan_shards(tmp_path / "out", "train").samples]
        assert sorted(m.replace(".jpg", ".JPEG") for m in members) == want


@pytest.mark.parametrize("wnid", ["..", "."])
def test_a_devkit_class_that_is_not_a_folder_name_is_refused(tmp_path, wnid):
    import imagenet_archives as A
    root = tmp_path / "a"
    write_archives(root, synsets=[(1, wnid, "dots")] + A.SYNSETS[1:])
    before = tree(tmp_path)
    error = the_error(invoke("imagenet", "--archives", root, "--out", tmp_path / "out", "--skip-md5"))
    assert f"ILSVRC2012_devkit_t12.tar.gz: its meta.mat names a class {wnid!r}" in error
    assert tree(tmp_path, skip=tmp_path / "out") == before


def test_same_named_archive_members_stay_distinct(tmp_path):
    root = tmp_path / "a"
    write_archives(root, rename=lambda name: "same.JPEG")
    assert invoke("imagenet", "--archives", root, "--out", tmp_path / "out", "--skip-md5").exit_code == 0
    assert sum(1 for _ in (tmp_path / "out" / "train").glob("*/*")) == 15
    assert sum(1 for _ in (tmp_path / "out" / "val").glob("*/*")) == 7


@pytest.mark.parametrize("case", ["inside", "same", "holds", "through a link", "archives"])
def test_out_overlapping_the_source_is_refused(archives, tmp_path, case):
    src = image_folder(tmp_path / "src", SMALL)
    os.symlink(src, tmp_path / "alias")
    (tmp_path / "a").mkdir()
    for f in archives[0].iterdir():
        os.symlink(f, tmp_path / "a" / f.name)
    out = {"inside": src / "train" / "prepared", "same": src, "holds": tmp_path,
           "through a link": tmp_path / "alias" / "prepared", "archives": tmp_path / "a" / "prepared"}[case]
    before = tree(tmp_path)
    if case == "archives":
        error = the_error(invoke("imagenet", "--archives", tmp_path / "a", "--out", out, "--skip-md5"))
        assert error.startswith(f"Error: --out: {out} is inside --archives {tmp_path / 'a'}")
    else:
        error = the_error(invoke("folder", "--src", src, "--out", out))
        assert error.startswith(f"Error: --out: {out} ") and f" --src {src};" in error
    assert tree(tmp_path) == before


def _cut_after(n):
    """A `_file_reader` whose ``n``th read is a Ctrl-C."""
    real, count = P._file_reader, [0]

    def reader(path):
        read = real(path)

        def r():
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt
            return read()
        return r
    return reader


CHANGES = {
    "added": (lambda s: (s / "train/c0/new.jpg").write_bytes(b"\xff\xd8new"), "train/c0 (files 2 -> 3, bytes "),
    "removed": (lambda s: (s / "train/c0/y.jpg").unlink(), "train/c0 (files 2 -> 1, bytes "),
    "rewritten": (lambda s: (s / "val/c1/w.jpg").write_bytes(b"\xff\xd8other"), "val/c1 (bytes "),
    "touched": (lambda s: os.utime(s / "val/c0/v.jpg", ns=(1, 1)), "val/c0 (modified)"),
    "new class": (lambda s: image_folder(s, ["train/c2/n.jpg", "val/c2/n.jpg"]), "train/c2 is new"),
}


@pytest.mark.parametrize("stage", ["finished", "half-finished"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_source_changed_since_its_preparation_is_refused_naming_what_changed(tmp_path, change, stage):
    src, out = image_folder(tmp_path / "src", SMALL), tmp_path / "out"
    args = ("folder", "--src", src, "--out", out, "--shard-size", "2", "--format",
            "folder" if stage == "finished" else "wds")
    if stage == "finished":
        assert invoke(*args).exit_code == 0
        assert "already prepared" in invoke(*args).output  # unchanged: nothing to do
    else:  # its first shard written
        with mock.patch.object(P, "_file_reader", _cut_after(3)), pytest.raises(KeyboardInterrupt):
            P.prepare_folder(str(src), str(out), shard_size=2, say=lambda t: None)
        assert (out / "train-000000.tar").is_file() and not (out / "index.json").exists()
    edit, needle = CHANGES[change]
    edit(src)
    before = tree(tmp_path)
    error = the_error(invoke(*args))
    assert f"Error: --src: {src} changed since {out} was prepared from it: {needle}" in error
    assert tree(tmp_path) == before


def test_changed_archives_are_refused_naming_them(archives, tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    for f in archives[0].iterdir():
        (root / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    assert invoke("imagenet", "--archives", root, "--out", out, "--skip-md5").exit_code == 0
    with open(root / "ILSVRC2012_img_val.tar", "ab") as f:
        f.write(b"\0" * 512)
    before = tree(tmp_path)
    error = the_error(invoke("imagenet", "--archives", root, "--out", out, "--skip-md5"))
    assert f"--archives: {root} changed since {out} was prepared from it: ILSVRC2012_img_val.tar (bytes " in error
    assert tree(tmp_path) == before


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_same_named_files_in_nested_folders_stay_distinct(tmp_path, fmt):
    files = ["train/c0/x.jpg", "train/c0/a/x.jpg", "train/c0/b/x.jpg", "train/c0/a/x.png", "train/c1/x.jpg",
             "val/c0/a/x.jpg", "val/c0/b/x.jpg", "val/c1/x.jpg"]
    src, out = image_folder(tmp_path / "src", files), tmp_path / "out"
    r = invoke("folder", "--src", src, "--out", out, "--format", fmt, "--shard-size", "3")
    assert r.exit_code == 0, r.output
    for split in ("train", "val"):
        want = {f: (src / f).read_bytes() for f in files if f.startswith(split)}
        if fmt == "folder":  # the same tree
            assert {str(p.relative_to(out)): p.read_bytes() for p in (out / split).rglob("*") if p.is_file()} == want
        else:
            shards = scan_shards(out, split)
            got = {s.member: shards.read(i) for i, s in enumerate(shards.samples)}
            assert len(got) == len(want) and sorted(got.values()) == sorted(want.values())


@pytest.mark.parametrize("name", ["prepare.json", "index.json"])
@pytest.mark.parametrize("content,needle", [(b"{not json", "not readable JSON"), (b"\xff\xfe\x00", "not readable JSON"),
                                            (b"[1, 2]", "holds a JSON list")])
def test_a_malformed_prepare_or_index_json_is_one_line_naming_it(tmp_path, name, content, needle):
    src, out = image_folder(tmp_path / "src", SMALL), tmp_path / "out"
    assert invoke("folder", "--src", src, "--out", out).exit_code == 0
    (out / name).write_bytes(content)
    before = tree(tmp_path)
    error = the_error(invoke("folder", "--src", src, "--out", out))
    assert error.startswith(f"Error: {out / name}: {needle}")
    assert tree(tmp_path) == before


def test_a_run_refused_before_writing_an_image_starts_again_from_the_fixed_archives(tmp_path):
    root, out = tmp_path / "a", tmp_path / "out"
    write_archives(root, devkit_extra=[("../x", b"")])
    assert "member ../x would be written outside --out" in the_error(
        invoke("imagenet", "--archives", root, "--out", out, "--skip-md5"))
    write_archives(root)  # downloaded again
    assert invoke("imagenet", "--archives", root, "--out", out, "--skip-md5").exit_code == 0
    assert sum(1 for _ in out.glob("*/*/*")) == 22


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_a_rerun_after_part_of_the_output_was_deleted_writes_it_again(jpeg_folder_4x6, tmp_path, fmt):
    import hashlib
    out = tmp_path / "out"
    from rmix.pipelines.prepare import prepare_folder
    prepare_folder(str(jpeg_folder_4x6), str(out), fmt=fmt, shard_size=5, say=lambda t: None)

    def files():
        return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}
    whole = files()
    if fmt == "folder":
        victims = [next(p for p in sorted((out / "train").rglob("*")) if p.is_file())]
        emptied = sorted(p for p in (out / "val").rglob("*") if p.is_file())[-1]
        emptied.write_bytes(b"")  # as `: > file`: there, but its bytes gone
    else:
        victims = [out / "train-000001.tar", out / "val-000000.idx"]
        cut = out / "train-000002.tar"
        cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 2])  # cut short
    for v in victims:
        v.unlink()
    said = []
    prepare_folder(str(jpeg_folder_4x6), str(out), fmt=fmt, shard_size=5, say=said.append)
    assert any("prepared before, but" in line and "writing that part again" in line for line in said), said
    assert files() == whole  # byte for byte what the first run wrote
