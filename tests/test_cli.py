"""The command line end to end on a tiny generated dataset, and its one-line errors."""
import json

import pytest
from click.testing import CliRunner

from helpers import TWO_EPOCHS, write_random_cifar10
from rmix.cli import cli


@pytest.fixture(scope="module")
def jpeg_folder_4x6_by_cli(tmp_path_factory):
    """conftest's jpeg_folder_4x6, written by `rmix data synth` (checked here)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    r = CliRunner().invoke(cli, ["data", "synth", "--out", str(out), "--classes", "4", "--train-per-class", "6",
                                 "--val-per-class", "3", "--width", "24", "--height", "24"])
    assert r.exit_code == 0, r.output
    return out


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_train_then_eval(jpeg_folder_4x6_by_cli, tmp_path, loader):
    out = tmp_path / "run"
    r = run(["train", "--data-dir", str(jpeg_folder_4x6_by_cli), "--loader", loader, "--out", str(out), *TWO_EPOCHS])
    assert r.exit_code == 0, r.output
    assert "best val top-1" in r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert {"epoch", "lr", "train_loss", "train_top1", "val_top1", "val_top5", "img_s"} <= set(rows[0])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 4 and cfg["data"]["loader"] == loader
    for name in ("latest.pt", "best.pt"):
        assert (out / name).is_file()
    r = run(["eval", "--checkpoint", str(out / "best.pt"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["images"] == 12 and 0 <= res["top1"] <= 100 and res["top5"] is None  # 4 classes: no top-5
    best = max(row["val_top1"] for row in rows)
    assert res["top1"] == pytest.approx(best)  # best.pt reproduces its logged accuracy


@pytest.mark.parametrize("aug", ["none", "mixup", "cutmix", "recursive_mix"])
def test_each_aug_trains(jpeg_folder_4x6_by_cli, tmp_path, aug):
    rm_only = ["--per-sample-boxes"] if aug == "recursive_mix" else []  # the others refuse it (they use one box)
    r = run(["train", "--data-dir", str(jpeg_folder_4x6_by_cli), "--aug", aug,
             "--out", str(tmp_path / aug), *TWO_EPOCHS, "--aug-alpha", "0.5", *rm_only, "--smoothing", "0.1"])
    assert r.exit_code == 0, r.output


def test_resume_continues_from_latest(jpeg_folder_4x6_by_cli, tmp_path):
    out = tmp_path / "run"
    assert run(["train", "--data-dir", str(jpeg_folder_4x6_by_cli), "--out", str(out), *TWO_EPOCHS]).exit_code == 0
    args = [a if a != "2" else "3" for a in TWO_EPOCHS]  # --epochs 3
    r = run(["train", "--data-dir", str(jpeg_folder_4x6_by_cli), "--out", str(out), "--resume", "auto",
             "--allow-changes", "epochs", *args])
    assert r.exit_code == 0, r.output
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("args,needle", [
    (["train", "--data-dir", "/nonexistent/dir"], "--data-dir"),
    (["train", "--aug", "mixmatch"], "--aug"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--aug-alpha", "2", "--aug", "recursive_mix"], "--aug-alpha"),
    (["train", "--model", "resnet9000"], "resnet9000"),
    (["train", "--milestones", "a,b"], "--milestones"),
    (["train", "--resume", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["eval", "--checkpoint", "/nonexistent/best.pt"], "/nonexistent/best.pt"),
    (["data", "synth", "--out", "{tmp}/x", "--classes", "1"], "classes"),
])
def test_bad_input_is_one_line_and_exit_2(jpeg_folder_4x6_by_cli, tmp_path, args, needle):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "train" and "--data-dir" not in args:
        args += ["--data-dir", str(jpeg_folder_4x6_by_cli), "--out", str(tmp_path / "r"), "--batch-size", "8"]
    r = CliRunner(mix_stderr=False).invoke(cli, args) if _has_mix_stderr() else CliRunner().invoke(cli, args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    err = (r.stderr if hasattr(r, "stderr") else r.output).strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_empty_data_dir(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and str(tmp_path) in r.output


def _has_mix_stderr():
    import inspect
    return "mix_stderr" in inspect.signature(CliRunner).parameters


def test_paper_layout_checkpoint_evaluates(jpeg_folder_4x6_by_cli, tmp_path):
    import torch

    from rmix.models import build
    sd = {f"module.{k}": v for k, v in build("resnet8", 4).state_dict().items()}
    p = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 300, "state_dict": sd, "optimizer": {}}, p)
    r = run(["eval", "--checkpoint", str(p), "--model", "resnet8", "--data-dir", str(jpeg_folder_4x6_by_cli), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["images"] == 12
    sd.pop("module.fc.bias")
    torch.save({"epoch": 300, "state_dict": sd}, p)
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(p), "--model", "resnet8",
                                 "--data-dir", str(jpeg_folder_4x6_by_cli)])
    assert r.exit_code == 2 and "fc.bias" in r.output and str(p) in r.output


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_cifar_folder_is_detected_and_trains(tmp_path, loader):
    root = write_random_cifar10(tmp_path / "cifar")
    out = tmp_path / "run"
    r = run(["train", "--data-dir", str(root), "--loader", loader, "--out", str(out), "--epochs", "1",
             "--batch-size", "16", "--model", "resnet8", "--workers", "1"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["dataset"] == "cifar10" and cfg["num_classes"] == 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1


def test_cifar_missing_files_is_an_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(tmp_path), "--epochs", "1"])
    assert r.exit_code == 2 and "cifar-10-batches-py" in r.output and len(r.output.strip().splitlines()) == 1


def test_bench_mix_json_at_tiny_size():
    r = run(["bench", "mix", "--batch", "4", "--size", "16", "--reps", "2", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["fused_ms"] > 0 and d["unfused_ms"] > 0 and d["speedup"] == pytest.approx(d["unfused_ms"] / d["fused_ms"])


def test_tensorboard_events_when_installed(jpeg_folder_4x6_by_cli, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert run(["train", "--data-dir", str(jpeg_folder_4x6_by_cli), "--out", str(out), *TWO_EPOCHS]).exit_code == 0
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_non_tty_progress_is_plain_lines():
    import io

    from rmix.progress import Progress
    buf = io.StringIO()
    with Progress(3, "epoch 1/1", every=1, stream=buf) as p:
        for _ in range(3):
            p.update(8, loss=1.0, lr=0.1)
    text = buf.getvalue()
    assert text.count("\n") == 3 and "\r" not in text and "\x1b" not in text and "img/s" in text


def test_completion_script():
    import os
    import shutil
    import subprocess
    if shutil.which("rmix") is None:
        pytest.skip("needs the installed rmix console script")
    r = subprocess.run(["rmix"], env={**os.environ, "_RMIX_COMPLETE": "bash_source"}, capture_output=True, text=True)
    assert r.returncode == 0 and "complete" in r.stdout


def test_the_command_line_loads_without_torch_until_a_command_runs():
    # `rmix --help` and shell completion stay fast: torch, DALI and timm load only where a command needs them
    import subprocess
    import sys
    code = ("import sys; from rmix.cli import cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0; "
            "r = CliRunner().invoke(cli, ['train', '--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'nvidia.dali', 'timm', 'torchvision') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("args,option", [
    (["--aug", "none", "--aug-omega", "0.7"], "--aug-omega"), (["--aug", "mixup", "--interpolate", "bilinear"],
                                                             "--interpolate"),
    (["--aug", "cutmix", "--per-sample-boxes"], "--per-sample-boxes"), (["--optimizer", "adamw", "--nesterov"],
                                                                      "--nesterov"),
    (["--optimizer", "adamw", "--momentum", "0.9"], "--momentum")])  # the last two: the defaults' own values
def test_an_option_the_run_does_not_use_is_refused_even_at_its_default(tmp_path, args, option):
    r = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and r.output.startswith(f"Error: {option}") and "drop it" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_a_presets_unused_setting_is_not_the_users(tmp_path):
    # the CIFAR preset sets omega 0.1; run with --aug cutmix, that omega is unused but nobody typed it
    r = CliRunner().invoke(cli, ["train", "--preset", "cifar10-pyramidnet200-rm", "--aug", "cutmix", "--data-dir",
                                 str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert "--aug-omega" not in r.output and "--data-dir" in r.output, r.output  # stopped at the data, later


@pytest.mark.parametrize("milestones", ["0", "-1", "3,-1"])
def test_milestones_before_the_first_epoch_are_refused(tmp_path, milestones):
    r = CliRunner().invoke(cli, ["train", "--epochs", "5", "--schedule", "step", f"--milestones={milestones}",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and r.output.startswith("Error: --milestones") and "epoch >= 1" in r.output, r.output


@pytest.mark.parametrize("milestones,late", [("5", "5"), ("2,7", "7"), ("4,5,6", "5,6")])
def test_milestones_typed_at_or_after_the_last_epoch_are_refused(tmp_path, milestones, late):
    r = CliRunner().invoke(cli, ["train", "--epochs", "5", "--schedule", "step", f"--milestones={milestones}",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and r.output.startswith(f"Error: --milestones: {late} at or after"), r.output
    assert "\n" not in r.output.strip() and not (tmp_path / "run").exists()


def test_a_presets_milestones_cut_short_by_epochs_are_said(jpeg_folder_4x6_by_cli, tmp_path):
    # the CIFAR recipe's (150, 225) in a 1-epoch try: kept as the preset's, and said once
    r = CliRunner().invoke(cli, ["train", "--preset", "cifar10-pyramidnet200-rm", "--dataset", "folder", "--data-dir",
                                 str(jpeg_folder_4x6_by_cli), "--model", "resnet8", "--epochs", "1",
                                 "--batch-size", "8", "--crop-size",
                                 "16", "--val-resize", "20", "--warmup", "0", "--workers", "1", "--loader", "torch",
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert r.output.count("milestones 150,225: 150,225 at or after the last epoch (1) never change the lr") == 1, r.output


def test_a_decode_error_outside_training_is_one_line_naming_the_check():
    from rmix.cli import _sorted
    from rmix.pipelines import DecodeError
    code, line = _sorted(DecodeError(0, 2, ["a/x.jpg", "b/y.jpg"], ["a/x.jpg"], "corrupt JPEG"))
    assert code == 1 and line.startswith("Error: cannot decode a/x.jpg (corrupt JPEG)") and "\n" not in line
    assert line.endswith("`rmix data check` names every file that does not decode")


@pytest.mark.parametrize("seed", ["-1", "99999999999999999999", "2147483648"])
def test_a_seed_out_of_range_is_one_line_naming_the_option(tmp_path, seed):
    r = CliRunner().invoke(cli, ["train", f"--seed={seed}", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and r.output.startswith("Error: --seed: must be in [0, 2**31)"), r.output
