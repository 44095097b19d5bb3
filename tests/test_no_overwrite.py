"""No command writes over its own input or a run's files, and each mistake is one `Error:` line (#31).

Each test makes the mistake through the CLI and checks the exit code, the one line naming the path
or option, and that everything already written is byte-for-byte what it was.
"""
import hashlib

import pytest
from click.testing import CliRunner

from helpers import RESNET8_16PX
from rmix.cli import cli

ONE_EPOCH_TORCH = ["--epochs", "1", *RESNET8_16PX, "--loader", "torch"]


def rmix(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(folder):
    """{name: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(r, needle):
    """The one `Error:` line of a refusal (exit 2), which must name `needle`."""
    lines = [line for line in r.output.strip().splitlines() if line.startswith("Error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(jpeg_folder_4x6, tmp_path_factory):
    """A finished one-epoch run directory (the tests only read it)."""
    out = tmp_path_factory.mktemp("r") / "run"
    r = rmix("train", "--data-dir", jpeg_folder_4x6, "--out", out, *ONE_EPOCH_TORCH)
    assert r.exit_code == 0, r.output
    return out


def test_export_onto_its_own_checkpoint_is_refused(run):
    before = snapshot(run)
    refused(rmix("export", run / "best.pt", "--out", run / "best.pt"), str(run / "best.pt"))
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["latest.pt", "config.json", "metrics.jsonl", "changes.jsonl"])
def test_export_onto_a_runs_file_is_refused(run, name):
    before = snapshot(run)
    refused(rmix("export", run / "best.pt", "--out", run / name), f"{run / name} is a file of the run")
    assert snapshot(run) == before


def test_export_next_to_a_run_is_allowed(run, tmp_path):
    r = rmix("export", run / "best.pt", "--out", tmp_path / "model.pth")
    assert r.exit_code == 0 and (tmp_path / "model.pth").is_file(), r.output


def test_export_to_a_directory_is_refused(run, tmp_path):
    refused(rmix("export", run / "best.pt", "--out", tmp_path), f"{tmp_path} is a directory")


def test_show_onto_a_runs_checkpoint_is_refused(run, jpeg_folder_4x6):
    before = snapshot(run)
    refused(rmix("show", "--data-dir", jpeg_folder_4x6, "--loader", "torch",
                 "--out", run / "best.pt"), str(run / "best.pt"))
    assert snapshot(run) == before


def test_show_out_directory_is_one_line(jpeg_folder_4x6, tmp_path):
    r = rmix("show", "--data-dir", jpeg_folder_4x6, "--loader", "torch", "--out", tmp_path)
    refused(r, f"--out: {tmp_path} is a directory")


def test_show_into_its_own_data_is_refused(jpeg_folder_4x6):
    before = snapshot(jpeg_folder_4x6)
    out = jpeg_folder_4x6 / "train" / "grid.png"
    refused(rmix("show", "--data-dir", jpeg_folder_4x6, "--loader", "torch",
                 "--out", out), f"{out} is inside {jpeg_folder_4x6}")
    assert snapshot(jpeg_folder_4x6) == before


@pytest.mark.parametrize("args, option", [(["--batch", "0"], "--batch:"), (["--alpha", "-1"], "--alpha:"),
                                          (["--seed", "-1"], "--seed:"), (["--batch", "1000"], "--batch")])
def test_show_errors_name_shows_options(jpeg_folder_4x6, tmp_path, args, option):
    line = refused(rmix("show", "--data-dir", jpeg_folder_4x6, "--loader", "torch",
                        "--out", tmp_path / "g.png", *args), option)
    assert "--batch-size" not in line and "--aug-alpha" not in line and "--keep-last" not in line
    assert not (tmp_path / "g.png").exists()


def test_plot_onto_its_metrics_is_refused(run):
    before = snapshot(run)
    refused(rmix("plot", run, "--out", run / "metrics.jsonl"), str(run / "metrics.jsonl"))
    refused(rmix("plot", run, "--out", run / "config.json"), str(run / "config.json"))
    assert snapshot(run) == before


def test_plot_out_directory_is_one_line(run, tmp_path):
    refused(rmix("plot", run, "--out", tmp_path), f"{tmp_path} is a directory")


def test_synth_into_an_existing_set_is_one_line(jpeg_folder_4x6):
    before = snapshot(jpeg_folder_4x6)
    refused(rmix("data", "synth", "--out", jpeg_folder_4x6, "--classes", "5"), f"--out: {jpeg_folder_4x6} is not empty")
    assert snapshot(jpeg_folder_4x6) == before


def test_synth_onto_a_file_is_one_line(run):
    before = snapshot(run)
    refused(rmix("data", "synth", "--out", run / "best.pt"), f"{run / 'best.pt'} is a file")
    assert snapshot(run) == before


def test_model_too_small_for_the_crop_is_one_line_and_leaves_no_run(jpeg_folder_4x6, tmp_path):
    pytest.importorskip("timm")
    r = rmix("train", "--data-dir", jpeg_folder_4x6, "--out", tmp_path / "r", *ONE_EPOCH_TORCH[:4], "--crop-size", "8",
             "--val-resize", "8", "--model", "timm/vit_tiny_patch16_224", "--loader", "torch")
    refused(r, "--crop-size: 8 px is too small for model 'timm/vit_tiny_patch16_224'")
    assert not (tmp_path / "r").exists()


def test_a_run_failing_before_its_first_epoch_leaves_no_directory(jpeg_folder_4x6, tmp_path):
    # batch 1 on a 1 x 1 feature map: BatchNorm refuses it at the first step, after config.json was written
    r = rmix("train", "--data-dir", jpeg_folder_4x6, "--out", tmp_path / "r", "--epochs", "1", "--batch-size", "1",
             "--crop-size", "4", "--val-resize", "4", "--model", "resnet8", "--workers", "1", "--loader", "torch")
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "r").exists()


def test_config_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"epochs = 2\n# \xff\xfe\n")
    refused(rmix("train", "--config", f), f"--config: {f} is not UTF-8")
    assert f.read_bytes() == b"epochs = 2\n# \xff\xfe\n"


@pytest.mark.parametrize("name", ["c.ini", "config"])
def test_config_of_an_unsupported_format_says_so(tmp_path, name):
    f = tmp_path / name
    f.write_text("[mix]\nalpha = 0.3\n")
    line = refused(rmix("train", "--config", f), f"--config: {f}")
    assert "not a supported format" in line and ".toml" in line and "not valid" not in line


def test_allow_changes_names_a_bogus_field(tmp_path):
    line = refused(rmix("train", "--out", tmp_path / "r", "--allow-changes", "bogus"), "--allow-changes: 'bogus'")
    assert "not a config field" in line and "--config" not in line
    line = refused(rmix("train", "--out", tmp_path / "r", "--allow-changes", "epoch"), "--allow-changes: 'epoch'")
    assert "epochs" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", ["optim:\n  lr: [1\n", ": : :\n", "!!python/object/apply:os.system ['true']\n"])
def test_a_yaml_config_that_does_not_parse_is_one_line(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    refused(rmix("train", "--config", f), f"--config: {f} is not valid yaml: ")


def test_allow_changes_without_a_resume_is_refused(tmp_path):
    refused(rmix("train", "--out", tmp_path / "r", "--allow-changes", "lr"), "--allow-changes: only a --resume")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text,option", [('{"mix": {"policy": "cutmix", "omega": 0.7}}', "--aug-omega"),
                                         ('{"mix": {"smoothing_form": "uniform"}}', "--smoothing-form")])
def test_a_config_files_setting_the_run_would_not_use_is_refused(tmp_path, text, option):
    f = tmp_path / "c.json"
    f.write_text(text)
    refused(rmix("train", "--config", f, "--out", tmp_path / "r"), f"{option}: only")
    assert not (tmp_path / "r").exists()


def test_a_saved_config_json_with_every_field_is_not_refused_for_its_defaults(tmp_path):
    # config.json of a CutMix run lists omega at its default: not the user's setting
    import json

    from rmix import config as C
    f = tmp_path / "config.json"
    f.write_text(json.dumps(C.to_dict(C.replace(C.TrainConfig(), **{"mix.policy": "cutmix"}))))
    r = rmix("train", "--config", f, "--data-dir", tmp_path / "none", "--out", tmp_path / "r")
    assert "--aug-omega" not in r.output and "--data-dir" in r.output, r.output


def test_smoothing_form_without_smoothing_is_refused(tmp_path):
    refused(rmix("train", "--smoothing-form", "uniform", "--out", tmp_path / "r"), "--smoothing-form: only label")
