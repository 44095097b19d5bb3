"""The reproduction scripts run end to end in their CPU smoke mode (SMOKE=1)."""
import json
import os
import shutil
import subprocess

import pytest

from helpers import ROOT, write_random_cifar10
from imagenet_archives import write_archives
from rmix.pipelines.synth import synth_dataset

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None or shutil.which("rmix") is None,
                                reason="needs the installed torchrun and rmix console scripts")


def smoke(script, *args):
    env = {**os.environ, "SMOKE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / script), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_reproduce_imagenet_smoke(tmp_path):
    data = synth_dataset(tmp_path / "data", classes=4, train_per_class=4, val_per_class=2, width=48, height=40)
    smoke("reproduce_imagenet.sh", data, 1, tmp_path / "out")
    for row in ("baseline", "mixup", "cutmix", "rm"):
        run = tmp_path / "out" / f"r50-{row}"
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["mix"]["policy"] == {"rm": "recursive_mix", "baseline": "none"}.get(row, row)
        assert cfg["optim"]["lr"] == 0.2 and cfg["data"]["aug_plus"]  # the preset, not the smoke overrides
        assert json.loads((run / "eval.json").read_text())["images"] == 8


@pytest.mark.slow
def test_reproduce_cifar10_smoke(tmp_path):
    data = write_random_cifar10(tmp_path / "cifar", n=8)
    out = smoke("reproduce_cifar10.sh", data, 1, tmp_path / "out")
    assert "over 3 seeds" in out
    seeds = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert seeds == [f"pyramidnet200-rm-seed{s}" for s in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [pytest.param("folder", marks=pytest.mark.heavy), "wds"])  # folder: test_prepare
def test_reproduce_imagenet_from_the_archives_prepares_once(tmp_path, fmt):
    archives = tmp_path / "archives"
    write_archives(archives, train_per_class=(4, 4, 4), val_ids=(1, 2, 3, 1, 2, 3))
    env = {**os.environ, "SMOKE": "1", "OMP_NUM_THREADS": "1", "FORMAT": fmt}
    cmd = ["bash", str(ROOT / "scripts/reproduce_imagenet.sh"), str(archives), "1", str(tmp_path / "out")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prepared = tmp_path / "out" / "data"
    assert json.loads((prepared / "index.json").read_text())["format"] == fmt
    for row in ("baseline", "mixup", "cutmix", "rm"):
        run = tmp_path / "out" / f"r50-{row}"
        assert json.loads((run / "config.json").read_text())["data"]["data_dir"] == str(prepared.resolve())
        assert json.loads((run / "eval.json").read_text())["images"] == 6
    stamp = (prepared / "index.json").stat().st_mtime_ns
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)  # again: nothing prepared twice
    assert r.returncode == 0 and "already prepared" in r.stderr
    assert (prepared / "index.json").stat().st_mtime_ns == stamp
