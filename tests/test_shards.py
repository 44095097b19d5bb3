"""Training on WebDataset shards: both loaders, the loader contract, exact resume, errors naming
``shard.tar:member``, and `rmix data check` / `rmix bench data` on shards."""
import collections
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import Cut, assert_same_run, cut_after_save, epoch_ids, loader_of, train_args
from rmix import checkpoint
from rmix.cli import cli
from rmix.pipelines import Backend, Crop, Share, scan_image_folder
from rmix.pipelines.dali import dali_slice
from rmix.pipelines.prepare import prepare_folder
from rmix.pipelines.wds import read_label, scan_shards

KW = dict(batch_size=8, crop_size=16, val_resize=20, workers=1, seed=3)


@pytest.fixture(scope="module")
def shards(jpeg_folder_4x6, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "w"
    prepare_folder(str(jpeg_folder_4x6), str(out), shard_size=5,
                   say=lambda t: None)  # 24 train in 5 shards, 12 val in 3
    return out


def batches(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_read_label_takes_every_number_with_whitespace_around_it():
    for v in (0, 7, 10, 99, 123, 1000, 98765, 4_000_000_000):
        for text in (f"{v}", f"{v}\n", f" {v}\r\n", f"\t{v} "):
            assert read_label(text.encode(), "s.tar:m") == v


def test_dali_slices_cover_every_sample_once():
    for n in (1, 7, 24, 1001):
        for w in (1, 2, 3, 8):
            if n >= w:
                assert sum(dali_slice(n, r, w) for r in range(w)) == n
                assert max(dali_slice(n, r, w) for r in range(w)) - min(dali_slice(n, r, w) for r in range(w)) <= 1


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_val_on_shards_is_val_on_the_folder(jpeg_folder_4x6, shards, kind):
    # val shards keep the files' order: the same batches, pixel for pixel, as the ImageFolder
    a = batches(loader_of(kind, scan_shards(shards, "val", labels=False), train=False, **KW))
    b = batches(loader_of(kind, scan_image_folder(jpeg_folder_4x6 / "val"), train=False, **KW))
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_a_train_epoch_reads_every_sample_once_and_is_addressable(shards, kind):
    loader = loader_of(kind, scan_shards(shards, "train", labels=False), train=True, **KW)
    split = scan_shards(shards, "train")
    assert len(loader) == 3 and loader.num_classes == 4 and loader.classes == split.classes
    e1 = batches(loader, 1)
    labels = torch.cat([y for _, y in e1])
    assert collections.Counter(labels.tolist()) == collections.Counter(s.label for s in split.samples)
    assert all(x.shape == (8, 16, 16, 3) and x.dtype == torch.uint8 for x, _ in e1)
    e0 = batches(loader, 0)
    again = batches(loader, 1)  # after another epoch ran: epoch 1 exactly
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, again))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(e0, e1))  # reshuffled
    loader.set_epoch(1, 2)
    tail = [(x.clone(), y.clone()) for x, y in loader]  # from batch 2: the same batch
    assert len(tail) == 1 and torch.equal(tail[0][0], e1[2][0]) and torch.equal(tail[0][1], e1[2][1])


def test_dali_ranks_read_disjoint_slices_with_the_same_batch_count(shards):
    kw = dict(KW, batch_size=4)
    loaders = [loader_of("dali", scan_shards(shards, "train", labels=False), train=True, rank=r, world_size=2, **kw) for r in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 3
    for epoch in (0, 1):
        got = [torch.cat([y for _, y in batches(ld, epoch)]) for ld in loaders]
        assert len(got[0]) == len(got[1]) == 12
    val = [loader_of("dali", scan_shards(shards, "val", labels=False), train=False, rank=r, world_size=2, **kw) for r in (0, 1)]
    assert sum(len(y) for ld in val for _, y in ld) == 12


@pytest.mark.slow
def test_train_and_eval_on_shards_with_both_loaders(shards, tmp_path):
    for loader in ("dali", "torch"):
        r = CliRunner().invoke(cli, train_args(shards, tmp_path / loader, "--loader", loader, "--epochs", "2"))
        assert r.exit_code == 0, r.output
        rows = [json.loads(x) for x in (tmp_path / loader / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == [1, 2]
        config = json.loads((tmp_path / loader / "config.json").read_text())
        assert config["data"]["dataset"] == "wds"
        r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / loader / "best.pt"), "--data-dir", str(shards),
                                     "--loader", loader, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output.strip().splitlines()[-1])["images"] == 12


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_cut_mid_epoch_on_shards_resumes_exactly(shards, tmp_path, monkeypatch, loader):
    ref = tmp_path / "ref"
    assert CliRunner().invoke(cli, train_args(shards, ref, "--loader", loader)).exit_code == 0
    real = cut_after_save(monkeypatch, 1, 2)
    out = tmp_path / "cut"
    r = CliRunner().invoke(cli, train_args(shards, out, "--loader", loader, "--save-every-steps", "1"))
    assert isinstance(r.exception, Cut), r.output
    monkeypatch.setattr(checkpoint, "save", real)
    r = CliRunner().invoke(cli, train_args(shards, out, "--loader", loader, "--save-every-steps", "1",
                                           "--resume", "auto"))
    assert r.exit_code == 0, r.output
    assert_same_run(out, ref)


@pytest.fixture
def broken(shards, tmp_path):
    """The shards with one train member's JPEG data overwritten (its headers intact)."""
    import shutil
    out = tmp_path / "broken"
    shutil.copytree(shards, out)
    split = scan_shards(out, "train")
    s = split.samples[7]
    with open(out / split.shards[s.shard], "r+b") as f:
        f.seek(s.offset + s.size // 2)
        f.write(b"\x00" * (s.size - s.size // 2))  # the scan data's second half gone
    return out, f"{out / split.shards[s.shard]}:{s.member}"


def test_data_check_and_the_preflight_name_the_member(broken, tmp_path):
    out, name = broken
    r = CliRunner().invoke(cli, ["data", "check", str(out), "--threads", "1"])
    assert r.exit_code == 1 and f"{name}: " in r.output, r.output  # with its reason
    r = CliRunner().invoke(cli, train_args(out, tmp_path / "run"))
    assert r.exit_code == 2 and name in r.output and "unreadable image" in r.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_a_decode_error_on_shards_names_the_member(broken, kind):
    from rmix.pipelines import DecodeError
    out, name = broken
    loader = loader_of(kind, scan_shards(out, "train", labels=False), train=True, **KW)
    with pytest.raises(DecodeError) as e:
        for epoch in range(3):
            batches(loader, epoch)
    assert name in e.value.bad_files and name in str(e.value) and "\n" not in str(e.value)


def test_shards_from_other_tools_without_an_index_are_read(shards, tmp_path):
    import shutil
    out = tmp_path / "plain"
    out.mkdir()
    for p in shards.glob("*.tar"):
        shutil.copy(p, out / p.name)  # no .idx and no index.json: classes from the labels
    for kind in ("dali", "torch"):
        got = batches(loader_of(kind, scan_shards(out, "val", labels=False), train=False, **KW))
        want = batches(loader_of(kind, scan_shards(shards, "val", labels=False), train=False, **KW))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))


def test_dali_reads_index_less_shards_through_the_index_rmix_counted_them_with(shards, tmp_path, capfd, monkeypatch):
    import gc
    import shutil
    import tempfile

    from rmix.pipelines import dali
    out = tmp_path / "plain"
    out.mkdir()
    for p in shards.glob("train-*.tar"):
        shutil.copy(p, out / p.name)
    shutil.copy(shards / "val-000000.tar", out)
    seen = []
    real = dali.shard_pipeline
    monkeypatch.setattr(dali, "shard_pipeline", lambda paths, index_paths, **kw: (
        seen.append([open(i).read() for i in index_paths or []]), real(paths, index_paths, **kw))[1])
    capfd.readouterr()
    before = set(Path(tempfile.gettempdir()).glob("rmix-wds-idx-*"))
    loader = loader_of("dali", scan_shards(out, "train", labels=False), train=True, **KW)
    (held,) = set(Path(tempfile.gettempdir()).glob("rmix-wds-idx-*")) - before
    got = batches(loader, epoch=1)
    want = batches(loader_of("dali", scan_shards(shards, "train", labels=False), train=True, **KW), epoch=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want)) and len(got) == 3
    # the indexes rmix wrote are the ones `rmix data prepare` wrote beside its shards, byte for byte
    assert seen[0] == [(shards / p.name).with_suffix(".idx").read_text() for p in sorted(shards.glob("train-*.tar"))]
    assert "Index file not provided" not in capfd.readouterr().err  # DALI inferred nothing, so said nothing
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in shards.glob("*-00000?.tar")
                                                           if p.name.startswith("train") or p.name == "val-000000.tar")
    del loader
    gc.collect()
    assert not held.exists()  # the written indexes go with their loader


def test_a_shard_dir_missing_a_split_is_one_line(shards, tmp_path):
    import shutil
    out = tmp_path / "train-only"
    shutil.copytree(shards, out)
    for p in out.glob("val-*"):
        p.unlink()
    r = CliRunner().invoke(cli, train_args(out, tmp_path / "run"))
    assert r.exit_code == 2 and "no val-NNNNNN.tar shards" in r.output


def test_keep_last_on_dali_shards_is_refused_where_ranks_would_differ(shards):
    from rmix.pipelines.dali import shard_loader
    split = scan_shards(shards, "train")
    nine = split._replace(samples=split.samples[:9])  # DALI's slices over 2 ranks: 4 and 5, so 1 and 2 batches of 4
    share = Share(9, train=True, batch_size=4, seed=0, rank=0, world_size=2, drop_last=False)
    with pytest.raises(ValueError, match=r"--keep-last: DALI's shard slices of 9 samples give \[1, 2\] batches"):
        shard_loader(nine, share, Crop(16, min_area=0.08, val_resize=20, aug_plus=False),
                     Backend("dali", 1, device=torch.device("cpu")))


@pytest.fixture(scope="module")
def solid_shards(solid_folder_3x5, tmp_path_factory):
    """solid_folder_3x5's solid-colour images (each tells which it is) as shards of 4: train and val alike."""
    import shutil
    src = tmp_path_factory.mktemp("solid")
    for split in ("train", "val"):
        shutil.copytree(solid_folder_3x5, src / split, ignore=shutil.ignore_patterns("*.txt"))
    out = tmp_path_factory.mktemp("solid-shards") / "w"
    prepare_folder(str(src), str(out), shard_size=4, say=lambda t: None)
    return out


def test_dali_train_slices_are_disjoint_within_an_epoch_and_rotate_across_epochs(solid_shards):
    # the loader contract: the ranks of an epoch read disjoint samples, and a rank reads another
    # slice each epoch (shard_id = (rank + epoch) % world), so no rank sees only a fixed part of the set
    loaders = [loader_of("dali", scan_shards(solid_shards, "train", labels=False), train=True, rank=r, world_size=2, batch_size=3,
                         crop_size=16, val_resize=20, workers=1, seed=3) for r in (0, 1)]
    seen = {}
    for e in (0, 1, 2):
        for r, loader in enumerate(loaders):
            loader.set_epoch(e)
            seen[r, e] = epoch_ids(loader)
            assert len(seen[r, e]) == len(set(seen[r, e])) == 6  # (15 // 2) // 3 batches of 3
        assert not set(seen[0, e]) & set(seen[1, e]), e  # disjoint within the epoch
    for r in (0, 1):
        assert not set(seen[r, 0]) & set(seen[r, 1]), r  # rotated: the other slice next epoch
        assert set(seen[r, 2]) & set(seen[r, 0]), r  # and back, two ranks later


def test_dali_val_on_three_ranks_reads_every_image_once_with_an_empty_last_batch(tmp_path):
    # 50 val samples on 3 ranks: DALI's slices are 16, 17, 17; at batch 16 rank 0's second batch is empty
    from rmix.pipelines.synth import synth_dataset
    data = synth_dataset(tmp_path / "d", classes=2, train_per_class=12, val_per_class=25, width=24, height=24)
    prepare_folder(str(data), str(tmp_path / "w"), shard_size=7, say=lambda t: None)
    sizes = []
    for r in range(3):
        loader = loader_of("dali", scan_shards(tmp_path / "w", "val", labels=False), train=False, batch_size=16, crop_size=16,
                           val_resize=20, workers=1, rank=r, world_size=3)
        sizes.append([len(y) for _, y in loader])
    assert sizes == [[16, 0], [16, 1], [16, 1]] and sum(map(sum, sizes)) == 50
