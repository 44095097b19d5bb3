"""Run logs (rmix.logs): every backend gets the same rows; one that fails costs a warning, never the run."""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers import TWO_EPOCHS_TORCH
from rmix import checkpoint, logs
from rmix.cli import cli


def train(data, out, *extra):
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out), *TWO_EPOCHS_TORCH, *extra])
    return r.exit_code, r.output


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Spy:
    """A backend that records what it is given, in the form the real ones take."""
    name, wants_steps = "spy", True
    seen = {}

    def __init__(self, run_dir, cfg, start):
        self.calls = Spy.seen.setdefault(type(self).__name__, [])
        self.calls.append(("start", cfg["epochs"]))

    def epoch(self, row):
        self.calls.append(("epoch", dict(row)))

    def step(self, values):
        self.calls.append(("step", dict(values)))

    def close(self, exit_code=0):
        self.calls.append(("close", exit_code))


class SpyA(Spy):
    pass


class SpyB(Spy):
    pass


def with_backends(monkeypatch, **classes):
    """Replace the optional backends by `classes` ({"tensorboard": cls, "wandb": cls})."""
    monkeypatch.setattr(logs, "OPTIONAL", {**logs.OPTIONAL, **classes})
    real = logs.importlib.util.find_spec
    monkeypatch.setattr(logs.importlib.util, "find_spec",  # both "installed"
                        lambda name, *a: object() if name in ("tensorboard", "wandb") else real(name, *a))


@pytest.mark.slow
def test_every_backend_gets_the_same_rows(jpeg_folder_4x6, tmp_path, monkeypatch):
    Spy.seen.clear()
    with_backends(monkeypatch, tensorboard=SpyA, wandb=SpyB)
    code, out = train(jpeg_folder_4x6, tmp_path / "run", "--log", "wandb")
    assert code == 0, out
    a, b = Spy.seen["SpyA"], Spy.seen["SpyB"]
    assert a == b
    epochs = [c[1] for c in a if c[0] == "epoch"]
    assert epochs == rows(tmp_path / "run")  # the same keys and values as metrics.jsonl
    steps = [c[1] for c in a if c[0] == "step"]
    assert [s["global_step"] for s in steps] == list(range(1, 7))  # 3 steps per epoch, --log-every 1
    assert all(set(s) == set(logs.STEP_KEYS) for s in steps)
    assert all(isinstance(s["step/loss"], float) and s["step/lr"] > 0 for s in steps)
    assert a[0] == ("start", 2) and a[-1] == ("close", 0)


class Raises(Spy):
    name = "flaky"

    when = "epoch"

    def __init__(self, run_dir, cfg, start):
        super().__init__(run_dir, cfg, start)
        if self.when == "start":
            raise ConnectionError("no route to api.example")

    def epoch(self, row):
        super().epoch(row)
        if self.when == "epoch":
            raise OSError("disk quota exceeded\nsecond line")

    def step(self, values):
        super().step(values)
        if self.when == "step" and values["global_step"] == 4:
            raise RuntimeError("step 4")


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start", "step", "epoch"])
def test_a_failing_backend_is_one_warning_and_the_run_is_intact(jpeg_folder_4x6, tmp_path, monkeypatch, when):
    ref = tmp_path / "ref"
    code, out = train(jpeg_folder_4x6, ref)
    assert code == 0, out
    Spy.seen.clear()
    flaky = type("Flaky", (Raises,), {"when": when})
    with_backends(monkeypatch, tensorboard=flaky)
    run = tmp_path / "run"
    code, out = train(jpeg_folder_4x6, run)
    assert code == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "flaky logging failed at " + when in warnings[0], out
    calls = Spy.seen["Flaky"]
    assert not [c for c in calls if c[0] == "close"]  # off after its failure: not called again
    if when == "epoch":
        assert sum(c[0] == "epoch" for c in calls) == 1
    strip = [{k: v for k, v in r.items() if k != "img_s"} for r in rows(run)]
    assert strip == [{k: v for k, v in r.items() if k != "img_s"} for r in rows(ref)]
    top1 = [r["val_top1"] for r in rows(ref)]
    best_epoch = top1.index(max(top1)) + 1  # the first epoch of the best top-1: a tie keeps the earlier
    for name, epoch in (("latest.pt", 2), ("best.pt", best_epoch)):
        got, want = checkpoint.read(run / name), checkpoint.read(ref / name)
        assert got["epoch"] == want["epoch"] == epoch
        assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])


def test_tensorboard_holds_the_epoch_rows_and_step_rows(jpeg_folder_4x6, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, out = train(jpeg_folder_4x6, tmp_path / "run")
    assert code == 0, out
    acc = EventAccumulator(str(tmp_path / "run/tb"))
    acc.Reload()
    for row in rows(tmp_path / "run"):
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                (event,) = [e for e in acc.Scalars(k) if e.step == row["epoch"]]
                assert event.value == pytest.approx(v, rel=1e-6)
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 7))


@pytest.mark.slow
def test_wandb_offline_writes_its_run_and_a_resume_continues_it(jpeg_folder_4x6, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_SERVICE", "")  # wandb records its service process here; gone after the test
    monkeypatch.delenv("WANDB_SERVICE")
    run = tmp_path / "run"
    code, out = train(jpeg_folder_4x6, run, "--log", "wandb", "--epochs", "1")
    assert code == 0 and "warning:" not in out, out
    run_id = (run / "wandb_id").read_text().strip()
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert offline.name.endswith(run_id)
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
    code, out = train(jpeg_folder_4x6, run, "--log", "wandb", "--resume", "auto", "--allow-changes", "epochs")
    assert code == 0 and "warning:" not in out, out
    assert (run / "wandb_id").read_text().strip() == run_id  # the same W&B run, continued
    assert [r["epoch"] for r in rows(run)] == [1, 2]


def test_log_names_what_is_missing_in_one_line(jpeg_folder_4x6, tmp_path, monkeypatch):
    code, out = train(jpeg_folder_4x6, tmp_path / "a", "--log", "neptune")
    assert code == 2 and out.strip().splitlines() == ["Error: --log: expected names among wandb, got 'neptune'"]
    real = logs.importlib.util.find_spec
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, out = train(jpeg_folder_4x6, tmp_path / "b", "--log", "wandb")
    assert code == 2 and len(out.strip().splitlines()) == 1 and "pip install 'rmix[wandb]'" in out, out
    assert not (tmp_path / "b").exists()  # refused before the run directory is made


def test_the_epoch_line_comes_once_its_checkpoint_is_written(jpeg_folder_4x6, tmp_path, monkeypatch):
    events, real = [], checkpoint.save
    monkeypatch.setattr(logs.Progress, "line", staticmethod(lambda text, *a, **k: events.append(text)))

    def save(path, payload):
        real(path, payload)
        events.append(f"saved {path.name} of epoch {payload['epoch']}")
    monkeypatch.setattr(checkpoint, "save", save)
    code, out = train(jpeg_folder_4x6, tmp_path / "run")
    assert code == 0, out
    lines = [e for e in events if e.startswith("epoch 1:")]
    assert len(lines) == 1 and events.index("saved latest.pt of epoch 1") < events.index(lines[0]), events


def test_a_metrics_row_cut_off_mid_append_is_dropped_and_another_bad_line_is_named(tmp_path):
    from rmix.logs import trim_metrics
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"epoch": e, "val_top1": 10.0 * e}) for e in (1, 2, 3)]
    path.write_text("\n".join(rows) + "\n" + '{"epoch": 4, "val_to')  # killed while writing epoch 4
    trim_metrics(path, 3)
    assert path.read_text() == rows[0] + "\n" + rows[1] + "\n"
    path.write_text(rows[0] + "\nnot json\n" + rows[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2, is not a metrics row"):
        trim_metrics(path, 3)


@pytest.mark.slow
def test_a_resume_leaves_tensorboard_one_event_per_epoch_and_step(jpeg_folder_4x6, tmp_path):
    # the killed run logged epoch 2 (rows and steps) but died before its checkpoint: the resume runs
    # epoch 2 again, and TensorBoard must hold it once, as metrics.jsonl does
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    code, out = train(jpeg_folder_4x6, run, "--epochs", "1")
    assert code == 0, out
    shutil.copy(run / "latest.pt", tmp_path / "epoch1.pt")
    code, out = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert code == 0, out
    shutil.copy(tmp_path / "epoch1.pt", run / "latest.pt")  # as if killed between epoch 2's logs and its save
    code, out = train(jpeg_folder_4x6, run, "--epochs", "2", "--resume", "auto", "--allow-changes", "epochs")
    assert code == 0, out
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_top1")] == [1, 2]
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 7))
    assert acc.Scalars("val_top1")[-1].value == pytest.approx(rows(run)[-1]["val_top1"])
