"""Runs written by main at e8bca81 (before #38): an epoch-end and a mid-epoch checkpoint, both with EMA."""
import pathlib
import sys

from click.testing import CliRunner

from rmix import checkpoint
from rmix.cli import cli
from rmix.pipelines.synth import synth_dataset

out = pathlib.Path(sys.argv[1])
data = synth_dataset(out / "data", classes=4, train_per_class=6, val_per_class=3, width=24, height=24)
ARGS = ["--epochs", "3", "--batch-size", "8", "--crop-size", "16", "--val-resize", "20", "--model", "resnet8",
        "--workers", "1", "--log-every", "1", "--ema", "0.9", "--loader", "torch", "--seed", "3"]

class Cut(Exception):
    pass

real = checkpoint.save
def run(name, epoch, step, *extra):
    def save_then_cut(path, payload):
        real(path, payload)
        if payload["epoch"] == epoch and payload.get("step", 0) == step:
            raise Cut
    checkpoint.save = save_then_cut
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out / name), *ARGS, *extra])
    checkpoint.save = real
    assert isinstance(r.exception, Cut), (r.output, r.exception)
    full = CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out / (name + "_full")), *ARGS, *extra])
    assert full.exit_code == 0, full.output

run("epoch_end", 1, 0)                                    # latest.pt after epoch 1
run("mid_epoch", 1, 2, "--save-every-steps", "1")        # latest.pt after step 2 of epoch 2
print("ok")
