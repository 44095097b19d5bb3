"""A run's files are never rewritten by a command that did not start that run (issue #37)."""
import json

import pytest
from click.testing import CliRunner

from helpers import RESNET8_16PX, Cut, cut_after_save
from rmix.cli import cli

RESNET8_16PX_TORCH = [*RESNET8_16PX, "--loader", "torch"]


def train(data, out, *extra):
    return CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out), *RESNET8_16PX_TORCH, *extra])


def snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_resume_auto_of_a_run_without_latest_is_refused_and_nothing_is_touched(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    (run / "latest.pt").unlink()
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--lr", "0.5", "--aug", "none")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith(f"Error: --resume auto: {run} holds a run"), line
    assert "metrics.jsonl" in line and "best.pt" in line and f"--resume {run / 'best.pt'}" in line
    assert snapshot(run) == before  # metrics, config and best.pt as they were


@pytest.mark.slow
def test_resume_auto_of_a_run_that_died_before_its_first_checkpoint_starts_it_again_as_configured(jpeg_folder_4x6,
                                                                                                  tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    config = json.loads((run / "config.json").read_text())
    for name in ("latest.pt", "best.pt", "metrics.jsonl"):
        (run / name).unlink()  # as a run killed in its first epoch leaves it: config.json alone
    r = train(jpeg_folder_4x6, run, "--epochs", "1", "--resume", "auto", "--lr", "0.5")
    assert r.exit_code == 2 and "optim.lr: saved" in r.output, r.output  # another run's settings: refused
    assert json.loads((run / "config.json").read_text()) == config
    r = train(jpeg_folder_4x6, run, "--epochs", "1", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert (run / "latest.pt").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_resume_auto_after_a_kill_between_the_first_row_and_the_first_checkpoint_starts_again(jpeg_folder_4x6,
                                                                                              tmp_path):
    # the epoch's row is written before its latest.pt: a kill between them leaves one row and no .pt
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    for name in ("latest.pt", "best.pt"):
        (run / name).unlink()
    (run / "metrics.jsonl").write_text(rows[0] + "\n")
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "latest.pt").is_file()


@pytest.mark.slow
def test_resume_auto_after_a_kill_inside_the_first_save_starts_again_and_drops_its_temporary(jpeg_folder_4x6, tmp_path):
    # killed while latest.pt was being written: one row and checkpoint.save's half-written temporary
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "best.pt").unlink()
    (run / "latest.pt").rename(run / ".tmp-k1ll3d.pt")
    (run / "metrics.jsonl").write_text(rows[0] + "\n")
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "latest.pt"]


def test_resume_auto_with_two_rows_and_no_checkpoint_is_refused(jpeg_folder_4x6, tmp_path):
    # a second row is written only after epoch 1's latest.pt landed: that latest.pt was removed since
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    for name in ("latest.pt", "best.pt"):
        (run / name).unlink()
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto")
    assert r.exit_code == 2 and "holds a run (config.json, metrics.jsonl)" in r.output, r.output
    assert snapshot(run) == before


@pytest.mark.slow
def test_resume_of_another_runs_checkpoint_into_a_directory_holding_a_run_is_refused(jpeg_folder_4x6, tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    assert train(jpeg_folder_4x6, base, "--epochs", "1").exit_code == 0
    assert train(jpeg_folder_4x6, other, "--epochs", "2", "--aug", "cutmix").exit_code == 0
    before = snapshot(other)
    r = train(jpeg_folder_4x6, other, "--epochs", "2", "--resume", str(base / "latest.pt"), "--allow-changes", "epochs")
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith(f"Error: --out: {other} already holds a run, and --resume"), line
    assert snapshot(other) == before


def renamed_copy(source, tmp_path, split=None):
    """A copy of the data with one class folder renamed (in `split`, or in both)."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(source, data)
    for s in ([split] if split else ["train", "val"]):
        first = sorted(p for p in (data / s).iterdir() if p.is_dir())[0]
        first.rename(first.with_name("zz-renamed"))
    return data


@pytest.mark.slow
def test_eval_of_a_checkpoint_on_data_with_other_class_names_is_refused(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    data = renamed_copy(jpeg_folder_4x6, tmp_path)
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(run / "latest.pt"), "--data-dir", str(data)])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "the classes differ (class 0 is 'circle' in the checkpoint, 'square'" in line, line
    assert CliRunner().invoke(cli, ["eval", "--checkpoint", str(run / "latest.pt"),
                                    "--data-dir", str(jpeg_folder_4x6)]).exit_code == 0


def test_train_and_val_with_other_class_names_are_refused_even_without_the_preflight(jpeg_folder_4x6, tmp_path):
    data = renamed_copy(jpeg_folder_4x6, tmp_path, split="val")
    r = train(data, tmp_path / "run", "--epochs", "1", "--no-preflight")
    assert r.exit_code == 2 and "the classes differ" in r.output and "in train" in r.output, r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_on_data_with_other_class_names_is_refused_and_added_images_are_named(jpeg_folder_4x6, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder_4x6, data)
    run = tmp_path / "run"
    assert train(data, run, "--epochs", "1").exit_code == 0
    before = snapshot(run)
    for s in ("train", "val"):
        first = sorted(p for p in (data / s).iterdir() if p.is_dir())[0]
        first.rename(first.with_name("zz-renamed"))
    r = train(data, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 2 and "--resume" in r.output and "the classes differ" in r.output, r.output
    assert snapshot(run) == before
    for s in ("train", "val"):  # the names back, and 6 more training images in the first class
        (data / s / "zz-renamed").rename(data / s / sorted(p.name for p in (jpeg_folder_4x6 / s).iterdir())[0])
    first = sorted((data / "train").iterdir())[0]
    for i, f in enumerate(sorted(first.iterdir())):
        shutil.copy(f, first / f"added-{i}{f.suffix}")
    r = train(data, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 0, r.output
    assert "now holds 30 training images" in r.output and "trained on 24" in r.output, r.output


@pytest.mark.parametrize("batch,images_after", [(4, 8), (2, 8), (1, 8), (16, 0), (3, None), (5, None)])
def test_a_mid_epoch_resume_with_another_batch_size_continues_at_the_same_image(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                                batch,
                                                                                 images_after):
    # 24 images an epoch at batch 8, cut after 16 of epoch 1: the epoch goes on with its last 8 images
    from rmix import checkpoint, engine
    run = tmp_path / "run"
    real = cut_after_save(monkeypatch, epoch=0, step=2)
    r = train(jpeg_folder_4x6, run, "--epochs", "1", "--save-every-steps", "1")
    assert isinstance(r.exception, Cut), r.output
    monkeypatch.setattr(checkpoint, "save", real)
    sizes, real_step = [], engine.train_step

    def counted(model, policy, images, *a, **kw):
        sizes.append(images.shape[0])
        return real_step(model, policy, images, *a, **kw)
    monkeypatch.setattr(engine, "train_step", counted)
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--epochs", "1", "--resume", "auto", "--batch-size", str(batch), "--allow-changes",
              "batch_size")
    if images_after is None:
        assert r.exit_code == 2 and "stopped after 16 images of epoch 1" in r.output, r.output
        assert ("continue at that image (per-process batch sizes that can, nearest "
                f"{batch}: 1, 2, 4, 8, 16; the saved one, 8, always can)") in r.output, r.output
        assert not sizes and snapshot(run) == before
    else:
        assert r.exit_code == 0, r.output
        assert sum(sizes) == images_after and set(sizes) <= {batch}, sizes  # 16: its one batch was the first 16
        assert (f"the saved history holds 8 images a process, a forward now takes {batch}; the next step pastes "
                "nothing" in r.output) == (batch > 8)


@pytest.mark.parametrize("extra,option", [
    (["--schedule", "cos", "--milestones", "1,2"], "--milestones"), (["--gamma", "0.5"], "--gamma"),
    (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum"), (["--optimizer", "adamw", "--no-nesterov"], "--nesterov"),
    (["--momentum", "0"], "--momentum"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-1"], "--lr"),
    (["--gamma", "0", "--schedule", "step"], "--gamma"), (["--aug-omega", "inf"], "--aug-omega"),
    (["--momentum", "1.5"], "--momentum")])
def test_a_setting_the_run_would_not_apply_is_refused(jpeg_folder_4x6, tmp_path, extra, option):
    r = train(jpeg_folder_4x6, tmp_path / "run", "--epochs", "1", *extra)
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and line.startswith(f"Error: {option}"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,option", [(["--crop-size", "20"], "--crop-size"), (["--val-resize", "40"], "--val-resize"),
                                          (["--aug-plus"], "--aug-plus"), (["--min-area", "0.5"], "--min-area")])
def test_image_file_settings_on_array_data_are_refused(tmp_path, extra, option):
    # Debian's Fashion-MNIST (the test machines install it): refused before anything is read
    r = CliRunner().invoke(cli, ["train", "--dataset", "fashion-mnist", "--out", str(tmp_path / "run"), "--epochs", "1",
                                 "--batch-size", "8", "--model", "resnet8", *extra])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"Error: {option}") and "read as arrays" in r.output, r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_kind_of_data_detected_is_said_once(jpeg_folder_4x6, tmp_path):
    r = train(jpeg_folder_4x6, tmp_path / "run", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert r.output.count(f"--data-dir {jpeg_folder_4x6}: read as an image folder (train/, val/), from its files") == 1
    r = train(jpeg_folder_4x6, tmp_path / "run2", "--epochs", "1", "--dataset", "folder")
    assert "read as" not in r.output  # named, not detected


def test_a_metrics_row_repeated_or_out_of_order_stops_the_resume_before_anything_is_written(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n")  # epoch 1's row again, after 2
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--epochs", "3", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 2 and "metrics.jsonl, line 3, is epoch 1 after epoch 2" in r.output, r.output
    assert snapshot(run) == before


@pytest.mark.parametrize("bad", ["[1, 2, 3]", '{"foo": 1}', "null", "3", '{"epoch": "2"}', "not json"])
@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_metrics_line_that_is_not_a_row_stops_the_resume_before_anything_is_written(jpeg_folder_4x6, tmp_path, bad,
                                                                                      where):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(1 if where == "middle" else len(lines), bad)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--epochs", "3", "--resume", "auto", "--allow-changes", "epochs")
    if where == "last" and bad == "not json":  # a row cut off mid-append: dropped, the run goes on
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "\n" not in line and "metrics.jsonl, line" in line and "is not a metrics row" in line, line
    assert snapshot(run) == before  # changes.jsonl and every other file untouched


@pytest.mark.slow
def test_a_mid_epoch_loader_switch_on_shards_is_refused(jpeg_folder_4x6, tmp_path, monkeypatch):
    from rmix import checkpoint
    from rmix.pipelines.prepare import prepare_folder
    shards = tmp_path / "w"
    prepare_folder(str(jpeg_folder_4x6), str(shards), shard_size=5, say=lambda t: None)
    run = tmp_path / "run"
    real = cut_after_save(monkeypatch, epoch=0, step=2)
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(shards), "--out", str(run), *RESNET8_16PX,
                                 "--loader", "dali", "--epochs", "1", "--save-every-steps", "1"])
    assert isinstance(r.exception, Cut), r.output
    monkeypatch.setattr(checkpoint, "save", real)
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(shards), "--out", str(run), *RESNET8_16PX,
                                 "--loader", "torch", "--epochs", "1", "--resume", "auto", "--allow-changes", "loader"])
    assert r.exit_code == 2 and "stopped inside epoch 1 of shards read by dali" in r.output, r.output
    assert "--loader dali" in r.output


@pytest.mark.parametrize("extra,option", [(["--schedule", "step", "--gamma", "0.5"], "--gamma")])
def test_gamma_without_milestones_is_refused(jpeg_folder_4x6, tmp_path, extra, option):
    r = train(jpeg_folder_4x6, tmp_path / "run", "--epochs", "1", *extra)
    assert r.exit_code == 2 and r.output.startswith(f"Error: {option}") and "milestones" in r.output, r.output


def test_the_batch_sizes_a_resume_offers_are_the_six_nearest_that_divide_what_was_seen():
    from rmix.state import _at_the_same_image
    part = {"step": 6, "seen": 48, "sums": None}
    assert _at_the_same_image(part, 8, 8, "x.pt", {"epoch": 0}) is part
    assert _at_the_same_image(part, 8, 12, "x.pt", {"epoch": 0})["step"] == 4
    with pytest.raises(ValueError, match=r"after 48 images of epoch 3 .* can, nearest 5: 2, 3, 4, 6, 8, 12; "
                                         r"the saved one, 8, always can\)"):
        _at_the_same_image(part, 8, 5, "x.pt", {"epoch": 2})


def resume_parts(tmp_path, dataset, extra=()):
    """What a resume (rmix.state.Checkpoints) is given for a one-epoch run of the CLI: (run, cfg, ckpt, model,
    optimizer, policy)."""
    from rmix import checkpoint
    from rmix import config as C
    from rmix.engine import build_optimizer, make_policy
    from rmix.models import build
    run = tmp_path / "run"
    assert train(dataset, run, "--epochs", "1", *extra).exit_code == 0
    ckpt = checkpoint.read(run / "latest.pt")
    cfg = C.from_dict(ckpt["config"])
    model = build(cfg.model, cfg.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    policy = make_policy(cfg, __import__("torch").device("cpu"), None)
    return run, cfg, ckpt, model, optimizer, policy


def test_a_resume_makes_an_older_checkpoints_optimizer_fused_and_restores_the_loss_scale(jpeg_folder_4x6, tmp_path):
    import torch

    from rmix.dist import Dist
    from rmix.state import Checkpoints
    run, cfg, ckpt, model, optimizer, policy = resume_parts(tmp_path, jpeg_folder_4x6)
    data = {"train_samples": 24, "classes": ckpt["data"]["classes"]}
    for g in ckpt["optimizer"]["param_groups"]:  # as checkpoints written before the fused optimizer
        g["fused"] = None
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # fp16 now, with a saved scale of 1024
    ckpt["scaler"] = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                      "_growth_tracker": 0}
    Checkpoints(cfg, Dist(), run, model, optimizer, scaler, policy, None, data, torch.device("cpu")).restore(
        ckpt, run / "latest.pt")
    assert all(g["fused"] is True for g in optimizer.param_groups) and scaler.get_scale() == 1024.0
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    ckpt["scaler"] = {}  # a run without fp16 saved no scale: the new fp16 run starts from torch's
    Checkpoints(cfg, Dist(), run, model, optimizer, fresh, policy, None, data, torch.device("cpu")).restore(
        ckpt, run / "latest.pt")
    assert fresh.get_scale() == torch.amp.GradScaler("cpu").get_scale()


def test_a_mid_epoch_checkpoint_of_another_process_count_is_refused_naming_its_step_and_epoch(jpeg_folder_4x6,
                                                                                              tmp_path):
    import torch

    from rmix.dist import Dist
    from rmix.state import Checkpoints
    run, cfg, ckpt, model, optimizer, policy = resume_parts(tmp_path, jpeg_folder_4x6)
    ckpt = {**ckpt, "step": 2, "epoch": 0, "partial_ranks": [{}, {}]}  # saved by 2 processes at step 2 of epoch 1
    data = {"train_samples": 24, "classes": ckpt["data"]["classes"]}
    with pytest.raises(ValueError, match="saved at step 2 of epoch 1 by 2 processes, this run has 1"):
        Checkpoints(cfg, Dist(), run, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), policy, None,
                    data, torch.device("cpu")).restore(ckpt, run / "latest.pt")


def test_save_every_steps_writes_a_mid_epoch_checkpoint_at_each_multiple_and_none_at_the_end(jpeg_folder_4x6, tmp_path,
                                                                                              monkeypatch):
    from rmix import checkpoint
    saved, real = [], checkpoint.save

    def spy(path, payload):
        saved.append((payload["epoch"], payload["step"]))
        real(path, payload)
    monkeypatch.setattr(checkpoint, "save", spy)
    r = train(jpeg_folder_4x6, tmp_path / "run", "--epochs", "1", "--batch-size", "4", "--save-every-steps", "2")
    assert r.exit_code == 0, r.output
    # 24 images at batch 4: 6 steps; mid-epoch saves after steps 2 and 4, then the epoch end (latest, best)
    assert saved[:2] == [(0, 2), (0, 4)] and all(s == (1, 0) for s in saved[2:]) and len(saved) in (3, 4)


@pytest.mark.slow
def test_a_resume_says_which_rows_it_lacks_and_where_the_best_is(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "2").exit_code == 0
    (run / "metrics.jsonl").write_text("")  # emptied by hand
    r = train(jpeg_folder_4x6, run, "--epochs", "3", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 0, r.output
    assert f"{run / 'metrics.jsonl'}: no rows for epochs 1,2, which latest.pt covers" in r.output, r.output
    new = tmp_path / "new"
    r = train(jpeg_folder_4x6, new, "--epochs", "4", "--resume", str(run / "latest.pt"), "--allow-changes", "epochs")
    assert r.exit_code == 0, r.output
    assert f"--resume {run / 'latest.pt'}: epochs 1-3 were trained into {run}" in r.output, r.output
    assert "best.pt stay there" in r.output


def test_a_complete_run_resumed_into_a_new_out_names_its_own_directory_and_leaves_no_other(jpeg_folder_4x6, tmp_path):
    run, new = tmp_path / "run", tmp_path / "new"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    before = snapshot(run)
    r = train(jpeg_folder_4x6, new, "--epochs", "1", "--resume", str(run / "latest.pt"))
    assert r.exit_code == 0, r.output
    assert f"{run} is complete: 1 of 1 epochs trained; nothing to do, and nothing is written to --out {new}" in r.output and f"run directory: {run}\n" in r.output
    assert not new.exists() and snapshot(run) == before


@pytest.mark.parametrize("saved", ["cuda state", "none"])
def test_a_resume_restores_the_cuda_generator_only_from_a_saved_cuda_state(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                           saved):
    # a GPU run's checkpoint restores CUDA's stream; a CPU run's (None) leaves a GPU's own alone
    import torch

    from rmix.dist import Dist
    from rmix.state import Checkpoints
    run, cfg, ckpt, model, optimizer, policy = resume_parts(tmp_path, jpeg_folder_4x6)
    data = {"train_samples": 24, "classes": ckpt["data"]["classes"]}
    state = torch.arange(16, dtype=torch.uint8)
    ckpt["rng_ranks"][0]["cuda"] = state if saved == "cuda state" else None
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a, **kw: calls.append(s))
    Checkpoints(cfg, Dist(), run, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), policy, None, data,
                torch.device("cpu")).restore(ckpt, run / "latest.pt")
    assert [c is state for c in calls] == ([True] if saved == "cuda state" else [])


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["lr", "garbage"])
def test_a_config_json_edited_since_is_named_at_resume_and_left_as_it_is(jpeg_folder_4x6, tmp_path, edit):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    config = run / "config.json"
    text = config.read_text().replace('"lr": 0.1', '"lr": 0.05') if edit == "lr" else "{"
    assert text != config.read_text()
    config.write_text(text)
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 0, r.output
    said = [line for line in r.output.splitlines() if line.startswith(f"{config}:")]
    want = "optim.lr is 0.05 there, 0.1 in" if edit == "lr" else "not this run's settings as rmix wrote them"
    assert len(said) == 1 and want in said[0], r.output
    assert config.read_text() == text


@pytest.mark.slow
def test_a_resume_with_a_recorded_change_does_not_call_config_json_edited(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    assert train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs").exit_code == 0
    r = train(jpeg_folder_4x6, run, "--epochs", "3", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 0 and "config.json:" not in r.output, r.output


@pytest.mark.slow
def test_a_checkpoint_from_before_mid_epoch_saves_resumes_at_its_epoch_end(jpeg_folder_4x6, tmp_path):
    # checkpoints written before --save-every-steps have no "step": they are epoch ends
    from rmix import checkpoint
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    ckpt = checkpoint.read(run / "latest.pt")
    payload = {k: v for k, v in ckpt.items() if k not in ("step", "foreign")}
    checkpoint.save(run / "latest.pt", payload)
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 0 and "resuming at epoch 2 (" in r.output, r.output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_a_resume_takes_another_path_to_the_same_data_and_refuses_other_data_there(jpeg_folder_4x6, tmp_path):
    import shutil
    run, same, other = tmp_path / "run", tmp_path / "same", tmp_path / "other"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    shutil.copytree(jpeg_folder_4x6, same)  # the data moved: another path, the same files
    shutil.copytree(jpeg_folder_4x6, other)
    first = sorted(p for p in (other / "train").iterdir() if p.is_dir())[0]
    sorted(first.iterdir())[0].unlink()  # the same classes, another training split
    before = snapshot(run)
    r = train(other, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 2 and "its training split differs" in r.output, r.output
    assert snapshot(run) == before
    r = train(same, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 0 and "now holds" not in r.output, r.output


def test_a_latest_pt_cut_short_names_best_pt_to_go_on_from(jpeg_folder_4x6, tmp_path):
    run = tmp_path / "run"
    assert train(jpeg_folder_4x6, run, "--epochs", "1").exit_code == 0
    data = (run / "latest.pt").read_bytes()
    (run / "latest.pt").write_bytes(data[:len(data) // 2])
    before = snapshot(run)
    r = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert r.exit_code == 2 and "cannot read checkpoint: truncated or damaged" in r.output, r.output
    assert f"`--resume {run / 'best.pt'}` continues from best.pt's epoch" in r.output and snapshot(run) == before
