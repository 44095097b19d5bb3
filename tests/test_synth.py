"""Properties of the embedded synthetic dataset generator."""

import json

import numpy as np
import pytest
from PIL import Image

from rmix.pipelines import synth
from rmix.pipelines.synth import CONCEPTS, MANIFEST, default_data_dir, synth_dataset

SYNTH_ARGS = dict(classes=10, train_per_class=3, val_per_class=2, width=24, height=24)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_arguments_give_identical_bytes(tmp_path):
    a = synth_dataset(tmp_path / "a", **SYNTH_ARGS)
    b = synth_dataset(tmp_path / "b", **SYNTH_ARGS)
    assert _files(a) == _files(b)
    for rel in _files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_seed_changes_the_pixels(tmp_path):
    a = synth_dataset(tmp_path / "a", **SYNTH_ARGS)
    b = synth_dataset(tmp_path / "b", **SYNTH_ARGS, seed=1)
    assert (a / "train/circle/00000.jpg").read_bytes() != (b / "train/circle/00000.jpg").read_bytes()


def test_smaller_sets_are_subsets(tmp_path):
    # Each file has its own seed, so fewer classes or images never reshuffle the rest.
    full = synth_dataset(tmp_path / "full", **SYNTH_ARGS)
    part = synth_dataset(tmp_path / "part", **{**SYNTH_ARGS, "classes": 3, "train_per_class": 2})
    for rel in _files(part):
        if rel.suffix == ".jpg":
            assert (part / rel).read_bytes() == (full / rel).read_bytes(), rel


def test_imagefolder_layout_and_counts(tmp_path):
    out = synth_dataset(tmp_path / "d", **SYNTH_ARGS)
    for split, count in (("train", 3), ("val", 2)):
        classes = sorted(p.name for p in (out / split).iterdir())
        assert classes == sorted(CONCEPTS[:10])
        for name in classes:
            assert len(list((out / split / name).glob("*.jpg"))) == count
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["counts"] == {"train": 30, "val": 20}
    assert manifest["classes"] == sorted(CONCEPTS[:10])
    assert all(0 < m < 1 for m in manifest["mean"]) and all(0 < s < 1 for s in manifest["std"])


def test_no_leftovers_next_to_the_output(tmp_path):
    synth_dataset(tmp_path / "d", **SYNTH_ARGS)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("size", [(24, 24), (37, 29)])
def test_files_decode_as_rgb_of_the_requested_size(tmp_path, size):
    out = synth_dataset(tmp_path / "d", **{**SYNTH_ARGS, "width": size[0], "height": size[1]})
    for path in out.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == size


def test_larger_sizes_draw_the_same_scene():
    # Same seed at 4x the size, shrunk back: nearly the same picture (another seed is far off).
    small = synth.render(np.random.default_rng(7), 0, 40, 30).astype(float)
    big = synth.render(np.random.default_rng(7), 0, 160, 120)
    shrunk = np.asarray(Image.fromarray(big).resize((40, 30), Image.BOX), dtype=float)
    other = synth.render(np.random.default_rng(8), 0, 40, 30).astype(float)
    assert np.abs(small - shrunk).mean() < 12 < 25 < np.abs(small - other).mean()


def test_worker_pool_gives_the_same_bytes(tmp_path, monkeypatch):
    a = synth_dataset(tmp_path / "a", **SYNTH_ARGS)
    monkeypatch.setattr(synth, "_PARALLEL_PIXELS", 0)
    b = synth_dataset(tmp_path / "b", **SYNTH_ARGS)
    for rel in _files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_complete_dataset_is_reused_and_foreign_dirs_are_refused(tmp_path):
    out = synth_dataset(tmp_path / "d", **SYNTH_ARGS)
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert synth_dataset(out, **SYNTH_ARGS) == out
    assert (out / MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        synth_dataset(out, **{**SYNTH_ARGS, "seed": 1})


def test_interrupted_generation_leaves_no_output(tmp_path, monkeypatch):
    calls = []
    real = synth.render

    def flaky(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synth, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth_dataset(tmp_path / "d", **SYNTH_ARGS)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth, "render", real)
    assert (synth_dataset(tmp_path / "d", **SYNTH_ARGS) / MANIFEST).is_file()


def test_partial_dir_without_manifest_is_not_complete(tmp_path):
    out = synth_dataset(tmp_path / "d", **SYNTH_ARGS)
    (out / MANIFEST).unlink()
    assert not synth._is_complete(out, synth._validate(**SYNTH_ARGS, seed=0, quality=90))


@pytest.mark.parametrize("name, value", [
    ("classes", 1), ("classes", len(CONCEPTS) + 1), ("train_per_class", 0), ("val_per_class", -1),
    ("width", 0), ("height", -5), ("quality", 0), ("seed", -1), ("width", 3.5),
])
def test_bad_arguments_name_the_argument_and_value(tmp_path, name, value):
    with pytest.raises(ValueError, match=rf"{name}.*{value}"):
        synth_dataset(tmp_path / "d", **{**SYNTH_ARGS, name: value})
    assert not (tmp_path / "d").exists()


def test_default_data_dir_honours_rmix_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synth, "DEFAULT_ARGS", {**SYNTH_ARGS, "seed": 0, "quality": 90})
    path = default_data_dir()
    assert path.parent == tmp_path / "cache" and path.name.startswith(f"shapes10-v{synth.VERSION}-24px")
    assert (path / MANIFEST).is_file()
    assert default_data_dir() == path


def test_default_data_dir_falls_back_to_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RMIX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(synth, "DEFAULT_ARGS", {**SYNTH_ARGS, "seed": 0, "quality": 90})
    assert default_data_dir().parent == tmp_path / "rmix"


def test_default_cache_name():
    assert synth._cache_name(synth.DEFAULT_ARGS) == f"shapes10-v{synth.VERSION}-40px-100+100"


def test_class_is_not_decodable_from_mean_colour():
    # Nearest class-mean-colour classifier, fit on one set and scored on another: near chance.
    def features(split_seed, n):
        xs, ys = [], []
        for label in range(10):
            for i in range(n):
                rng = np.random.default_rng([split_seed, label, i])
                xs.append(synth.render(rng, label, 24, 24).reshape(-1, 3).mean(0))
                ys.append(label)
        return np.array(xs), np.array(ys)

    x, y = features(0, 30)
    centres = np.stack([x[y == k].mean(0) for k in range(10)])
    xv, yv = features(1, 30)
    pred = np.argmin(((xv[:, None] - centres[None]) ** 2).sum(-1), 1)
    assert (pred == yv).mean() < 0.25  # chance is 0.10


def test_only_the_class_shape_is_a_concept(monkeypatch):
    # v2: distractors are clutter, never another class's shape shrunk, so shrinking an image as a
    # whole (RecursiveMix's paste) cannot turn its class into a distractor-sized cue
    drawn = []
    real = synth._draw_concept

    def spy(canvas, rng, label, cx, cy, r, colour):
        drawn.append((label, r))
        return real(canvas, rng, label, cx, cy, r, colour)

    monkeypatch.setattr(synth, "_draw_concept", spy)
    for label in range(10):
        for index in range(20):
            drawn.clear()
            synth.render(np.random.default_rng([0, 0, label, index]), label, 40, 40)
            assert [k for k, _ in drawn] == [label] and 0.26 * 40 <= drawn[0][1] <= 0.42 * 40


@pytest.mark.slow
def test_the_embedded_set_says_once_where_it_is_written(tmp_path, monkeypatch, capsys):
    from rmix.pipelines.synth import default_data_dir
    monkeypatch.setenv("RMIX_CACHE", str(tmp_path / "cache"))
    path = default_data_dir()
    said = capsys.readouterr().err
    assert said.count("rmix: writing the embedded dataset") == 1 and str(path) in said and "once" in said
    assert default_data_dir() == path and capsys.readouterr().err == ""  # found there the next time: silent
