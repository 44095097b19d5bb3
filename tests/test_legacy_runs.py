"""Runs written before the #38 redesign (main at e8bca81, tests/data/legacy/make_legacy.py) still work:
their checkpoints load, evaluate to the figures that code printed, and resume to the end. The figures
are the old code's own output, recorded once; the resumed rows are the old code's uninterrupted run."""
import json
import pathlib
import shutil

import pytest
from click.testing import CliRunner

from rmix.cli import cli
from rmix.pipelines.synth import synth_dataset

LEGACY = pathlib.Path(__file__).parent / "data" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())


@pytest.fixture(scope="module")
def legacy_data(tmp_path_factory):
    """The synthetic set the legacy runs trained on, written again (deterministic), at another path."""
    return synth_dataset(tmp_path_factory.mktemp("legacy") / "data", classes=4, train_per_class=6,
                         val_per_class=3, width=24, height=24)


def copy_run(name, tmp_path):
    run = tmp_path / name
    shutil.copytree(LEGACY / name, run)
    return run


@pytest.mark.parametrize("name", ["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("weights", ["model", "ema"])
def test_a_legacy_checkpoint_evaluates_to_its_figures(legacy_data, tmp_path, name, weights):
    run = copy_run(name, tmp_path)
    args = ["eval", "--checkpoint", str(run / "latest.pt"), "--data-dir", str(legacy_data), "--json"]
    r = CliRunner().invoke(cli, args + (["--ema"] if weights == "ema" else []))
    assert r.exit_code == 0, r.output
    got = json.loads(r.output.strip().splitlines()[-1])
    top1, loss = EXPECTED["eval"][name][weights]
    assert got["top1"] == top1 and got["images"] == 12
    assert got["loss"] == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("name", ["epoch_end", "mid_epoch"])
def test_a_legacy_run_resumes_to_the_end(legacy_data, tmp_path, name):
    run = copy_run(name, tmp_path)
    before = (run / "latest.pt").read_bytes()
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(legacy_data), "--out", str(run), "--resume", "auto"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = EXPECTED["full_rows"][name]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for got, expected in zip(rows, want):  # the old code's uninterrupted run, row by row
        for k, v in expected.items():
            assert got[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), (got["epoch"], k)
    assert (run / "latest.pt").read_bytes() != before  # it trained on, from the old file
