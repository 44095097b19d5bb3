"""scripts/finetune_cpu.py's table: each arm's mean ± std over its seeds, from the runs' metrics.jsonl."""
import json
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import finetune_cpu  # noqa: E402


def run(path, epochs, val, train=50.0):
    """A finished run: config.json and one row per epoch, `val` (the val top-1 per epoch, None = not evaluated)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"epochs": epochs}))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "val_top1": v, "train_top1": train}) + "\n"
                                                for e, v in enumerate(val)))
    (path / "wall.json").write_text(json.dumps({"seconds": 120.0}))


def test_the_section_has_each_arms_mean_and_std_and_the_commands(tmp_path):
    run(tmp_path / "pretrain-shapes", 2, [60.0, 70.0])
    run(tmp_path / "pretrained" / "none-s0", 3, [None, 80.0, 79.0], train=90.0)
    run(tmp_path / "pretrained" / "none-s1", 3, [None, 81.0, 83.0], train=92.0)
    run(tmp_path / "scratch" / "cutmix-s0", 3, [None, None, 75.0])
    (tmp_path / "scratch" / "cutmix-s1").mkdir(parents=True)  # not finished: left out, the table says partial
    text = finetune_cpu.section(tmp_path, [0, 1])
    lines = text.splitlines()
    assert "(partial: 3 of 12 runs finished)" in lines[1]
    assert "The pretraining run reached 70.00% val top-1 on the embedded set (best 70.00%)." in text
    # best: 80, 83 -> 81.50 ± 2.12; final: 79, 83 -> 81.00 ± 2.83; train 90, 92 -> 91.00 ± 1.41
    assert ("| pretrained | none | 81.50 ± 2.12 | 81.00 ± 2.83 | 91.00 ± 1.41 | s0 80.00 / 79.00, s1 83.00 / 83.00 | "
            "2.0 min |") in lines
    assert "| scratch | cutmix | 75.00 ± 0.00 | 75.00 ± 0.00 | 50.00 ± 0.00 | s0 75.00 / 75.00 | 2.0 min |" in lines
    assert "| scratch | recursive_mix | n/a | n/a | n/a | n/a | n/a |" in lines
    assert (f"rmix train --preset cpu-fashion-finetune --aug cutmix --aug-alpha 1.0 --init-from "
            f"{tmp_path / 'pretrain-shapes' / 'latest.pt'} --seed $SEED --out {tmp_path / 'pretrained' / 'cutmix-s$SEED'} "
            "--resume auto") in lines
