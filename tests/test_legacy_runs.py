"""Runs written before the #38 redesign (main at e8bca81, tests/data/legacy/make_legacy.py) still work:
their checkpoints load, evaluate to the figures that code printed, and resume to the end. The figures
are the old code's own output, recorded once; the rows it wrote stay, and the resume trains the rest."""
import json
import math
import pathlib
import shutil

import pytest
from click.testing import CliRunner

from rmix.cli import cli

LEGACY = pathlib.Path(__file__).parent / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


def copy_run(name, tmp_path):
    run = tmp_path / name
    shutil.copytree(LEGACY / name, run)
    return run


@pytest.mark.parametrize("name", ["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("weights", ["model", "ema"])
def test_a_legacy_checkpoint_evaluates_to_its_figures(jpeg_folder_4x6, tmp_path, name, weights):
    run = copy_run(name, tmp_path)
    args = ["eval", "--checkpoint", str(run / "latest.pt"), "--data-dir", str(jpeg_folder_4x6), "--json"]
    r = CliRunner().invoke(cli, args + (["--ema"] if weights == "ema" else []))
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.strip().splitlines()[-1])
    top1, loss = EXPECTED["eval"][name][weights]
    assert got["top1"] == top1 and got["images"] == 12
    assert got["loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["epoch_end", "mid_epoch"])
def test_a_legacy_run_resumes_to_the_end(jpeg_folder_4x6, tmp_path, name):
    run = copy_run(name, tmp_path)
    before = (run / "latest.pt").read_bytes()
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(run), "--resume", "auto"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = EXPECTED["full_rows"][name]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    kept = len((LEGACY / name / "metrics.jsonl").read_text().splitlines())
    for got, expected in zip(rows[:kept], want):  # the rows the old code wrote stay as they were
        for k, v in expected.items():
            assert got[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), (got["epoch"], k)
    # the epochs trained now draw the loaders' augmentation from pipelines/seeds.py's streams, which #38 made one
    # scheme (the old code's uninterrupted run differs there: docs/RUNS.md); they are whole rows of figures
    for got in rows[kept:]:
        assert set(want[0]) <= set(got) and all(0 <= got[k] <= 100 for k in ("train_top1", "val_top1", "val_top1_ema"))
        assert all(math.isfinite(got[k]) for k in ("train_loss", "val_loss", "val_loss_ema"))
    assert (run / "latest.pt").read_bytes() != before  # it trained on, from the old file


def old_torch_augment_streams(seed, stream, *, rank=0, epoch=0, bits=63):
    """The torch loader's per-sample augmentation seeds as main drew them before #38 (the only stream a
    resumed legacy run on the torch loader draws afresh; its box and process streams are in the checkpoint)."""
    import numpy as np
    assert stream == "torch_augment"
    old = int(np.random.SeedSequence([seed]).generate_state(1)[0] & 0x7FFF_FFFF)
    return np.random.SeedSequence([old, epoch])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["epoch_end", "mid_epoch"])
def test_a_legacy_run_given_its_old_streams_resumes_to_its_uninterrupted_rows(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                              name):
    from rmix.pipelines import torch_loader
    monkeypatch.setattr(torch_loader, "derive", old_torch_augment_streams)
    run = copy_run(name, tmp_path)
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(jpeg_folder_4x6), "--out", str(run), "--resume", "auto"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = EXPECTED["full_rows"][name]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for got, expected in zip(rows, want):  # the old code's uninterrupted run, row by row: the restore is exact
        for k, v in expected.items():
            assert got[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), (got["epoch"], k)
