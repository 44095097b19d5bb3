"""--accum-steps: K micro-batches make one optimizer step whose update is the whole batch's; RecursiveMix's
history is the previous micro-batch; steps, checkpoints and --max-steps count optimizer steps."""
import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from helpers import Cut, assert_same_run, cli_train, cut_after_save, rows
from rmix import checkpoint, engine
from rmix import config as C
from rmix.cli import cli
from rmix.engine import build_optimizer, make_policy, train_step
from rmix.models.roi import RoIClassifier
from rmix.schedule import lr_at


class NoNorm(RoIClassifier):
    """Two convolutions and the RoI head, no BatchNorm: its gradient is a plain mean over the images, so
    micro-batches can sum to the whole batch's (BatchNorm's statistics are per forward)."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)
        self._init_roi_head(False)

    def forward_features(self, images):
        return F.relu(self.conv2(F.relu(self.conv1(images))))


def config(**changes):
    base = C.replace(C.with_dataset_stats(C.TrainConfig(), "folder"), model="resnet8", num_classes=5, device="cpu",
                     seed=3)
    return C.replace(base, **changes)


def steps_of(cfg, batches, accum):
    """The weights after one train_step per batch, micro-batched `accum` ways, from the same start."""
    torch.manual_seed(0)
    model = NoNorm(cfg.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    policy = make_policy(cfg, torch.device("cpu"), None)
    losses = []
    for images, targets in batches:
        loss, logits, soft, bad = train_step(model, policy, images, targets, optimizer, scaler, None, cfg.mix.omega,
                                             rm=cfg.mix.policy == "recursive_mix", accum=accum)
        assert logits.shape == (len(targets), cfg.num_classes) and soft.shape == logits.shape and not bad.item()
        losses.append(loss.item())
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def batches_of(*sizes):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g),
             torch.randint(0, 5, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("accum", [2, 4])
def test_micro_batches_give_the_whole_batchs_update(accum):
    # SGD with Nesterov momentum and weight decay over 4 steps; the last batch of 10 splits 3, 3, 2, 2 four
    # ways: each micro-batch's loss counts by its share of the batch, not 1/K
    cfg = config(**{"mix.policy": "none", "optim.lr": 0.2, "optim.weight_decay": 1e-3})
    batches = batches_of(12, 12, 12, 10)
    whole, whole_losses = steps_of(cfg, batches, 1)
    parts, part_losses = steps_of(cfg, batches, accum)
    assert any((whole[k] != steps_of(cfg, batches[:1], 1)[0][k]).any() for k in whole)  # the steps moved the weights
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=1e-5, atol=1e-6, msg=k)
    assert part_losses == pytest.approx(whole_losses, rel=1e-5)  # the step's loss is the batch's mean


def test_recursive_mix_pastes_the_previous_micro_batch_and_the_step_comes_after_the_last():
    cfg = config(**{"mix.alpha": 1.0})
    torch.manual_seed(0)
    model = NoNorm(5)
    optimizer = build_optimizer(model, cfg.optim)
    policy = make_policy(cfg, torch.device("cpu"), None)
    events, real_step = [], optimizer.step

    class Spy:  # the policy, each call and remember recorded with the history it mixes and the images it keeps
        prev_logits = property(lambda self: policy.prev_logits)

        def __call__(self, images, targets):
            events.append(("mix", len(targets), None if policy.history is None else policy.history.data_ptr()))
            return policy(images, targets)

        def remember(self, images, soft, logits):
            events.append(("remember", len(soft), images.data_ptr()))
            policy.remember(images, soft, logits)

    optimizer.step = lambda *a, **k: (events.append(("step",)), real_step(*a, **k))[1]
    for images, targets in batches_of(8, 8):
        train_step(model, Spy(), images, targets, optimizer, torch.amp.GradScaler("cpu", enabled=False), None,
                   cfg.mix.omega, rm=True, accum=2)
    kinds = [e[0] for e in events]
    assert kinds == ["mix", "remember", "mix", "remember", "step"] * 2
    assert all(e[1] == 4 for e in events if e[0] != "step")  # micro-batches of 8 / 2
    mixes, remembered = [e for e in events if e[0] == "mix"], [e for e in events if e[0] == "remember"]
    assert mixes[0][2] is None  # the epoch's first micro-batch has no history
    for k in range(1, 4):  # every later one pastes the micro-batch just before it, across the step boundary too
        assert mixes[k][2] == remembered[k - 1][2]


def test_only_the_last_micro_batch_all_reduces_under_ddp():
    cfg = config(**{"mix.policy": "none"})
    torch.manual_seed(0)
    inner, held = NoNorm(5), []

    class Wrapped(nn.Module):  # DDP's interface: no_sync() holds the all-reduce back
        def __init__(self):
            super().__init__()
            self.module, self.syncing = inner, True

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, x):
            held.append(self.syncing)
            return self.module(x)

    model = Wrapped()
    optimizer = build_optimizer(inner, cfg.optim)
    policy = make_policy(cfg, torch.device("cpu"), None)
    for images, targets in batches_of(9, 6):
        train_step(model, policy, images, targets, optimizer, torch.amp.GradScaler("cpu", enabled=False), None, 0.0,
                   rm=False, accum=3)
    assert held == [False, False, True] * 2


def test_the_batch_must_split_into_equal_micro_batches_and_auto_keeps_the_micro_batch():
    cfg = config(batch_size=48, accum_steps=0, micro_batch=8)
    assert [C.accumulation(cfg, n) for n in (1, 2, 3, 6, 12)] == [6, 3, 2, 1, 1]  # 12 processes: 4 a forward
    with pytest.raises(ValueError, match=r"--accum-steps auto: --batch-size 48 over 1 process is 48 a process, not a "
                                         r"whole number of --micro-batch 10"):
        C.accumulation(C.replace(cfg, micro_batch=10), 1)
    with pytest.raises(ValueError, match=r"--accum-steps 5: --batch-size 48 over 2 processes is 24 a process, which "
                                         r"does not split into 5 equal micro-batches"):
        C.accumulation(C.replace(cfg, accum_steps=5), 2)
    assert C.accumulation(C.replace(cfg, accum_steps=4), 2) == 4


# ---- through `rmix train`: the engine hands --accum-steps to the step; helpers.THREE_EPOCHS is batch 8,
# 3 steps an epoch on jpeg_folder_4x6


@pytest.fixture
def steps(monkeypatch):
    """(images, accum) of every train_step the engine calls from now on."""
    calls, real = [], engine.train_step

    def counted(model, policy, images, *a, **kw):
        calls.append((images.shape[0], kw["accum"]))
        return real(model, policy, images, *a, **kw)
    monkeypatch.setattr(engine, "train_step", counted)
    return calls


@pytest.fixture
def no_norm_model(monkeypatch):
    monkeypatch.setattr(engine, "build_model", lambda cfg, device: NoNorm(cfg.num_classes).to(device))


@pytest.mark.slow
def test_a_run_with_accum_steps_trains_as_one_with_whole_batches(jpeg_folder_4x6, tmp_path, no_norm_model):
    runs = {}
    for k in (1, 2, 4):
        runs[k] = tmp_path / f"k{k}"
        r = cli_train(jpeg_folder_4x6, runs[k], "--aug", "none", "--accum-steps", str(k), "--loader", "torch")
        assert r.exit_code == 0, r.output
        assert (f"--accum-steps {k}: each optimizer step's batch of 8 is 1 process x {k} micro-batches of {8 // k}"
                in r.output) == (k > 1), r.output
        assert json.loads((runs[k] / "config.json").read_text())["accum_steps"] == k
    want = checkpoint.read(runs[1] / "latest.pt")["model"]
    for k in (2, 4):
        got = checkpoint.read(runs[k] / "latest.pt")["model"]
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
        assert [r["train_loss"] for r in rows(runs[k])] == pytest.approx([r["train_loss"] for r in rows(runs[1])],
                                                                         rel=1e-4)


@pytest.mark.slow
def test_max_steps_and_the_schedule_count_optimizer_steps(jpeg_folder_4x6, tmp_path, steps):
    r = cli_train(jpeg_folder_4x6, tmp_path / "run", "--accum-steps", "4", "--max-steps", "2", "--schedule", "cos")
    assert r.exit_code == 0, r.output
    assert steps == [(8, 4)] * 6  # 2 optimizer steps of the whole batch in each of the 3 epochs
    lrs = [row["lr"] for row in rows(tmp_path / "run")]  # per epoch, as without accumulation
    assert lrs == pytest.approx([lr_at(e, C.TrainConfig().optim.lr, 3, schedule="cos") for e in (1, 2, 3)])


@pytest.mark.slow
def test_a_cut_mid_epoch_with_accum_steps_resumes_exactly(jpeg_folder_4x6, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert cli_train(jpeg_folder_4x6, whole, "--accum-steps", "2").exit_code == 0
    out = tmp_path / "cut"
    real = cut_after_save(monkeypatch, 1, 2)  # right after epoch 2's step-2 checkpoint
    r = cli_train(jpeg_folder_4x6, out, "--accum-steps", "2", "--save-every-steps", "1")
    assert isinstance(r.exception, Cut), r.output
    ckpt = checkpoint.read(out / "latest.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)  # saved at an optimizer step, never between micro-batches
    assert ckpt["partial_ranks"][0]["seen"] == 16 and ckpt["partial_ranks"][0]["policy"]["history"].shape[0] == 4
    monkeypatch.setattr(checkpoint, "save", real)
    r = cli_train(jpeg_folder_4x6, out, "--accum-steps", "2", "--save-every-steps", "1", "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert_same_run(out, whole)


@pytest.mark.parametrize("value,message", [
    ("3", "--accum-steps 3: --batch-size 8 over 1 process is 8 a process, which does not split into 3 equal "
          "micro-batches"),
    ("9", "--accum-steps: must be at most --batch-size (8): a micro-batch holds at least one image, got 9"),
    ("-1", "--accum-steps: must be >= 1, or auto (0), got -1"),
    ("two", "--accum-steps: expected a number of micro-batches or auto, got 'two'"),
    ("auto", "--accum-steps: needs --micro-batch N, the images a process takes per forward, got 'auto'"),
])
def test_a_bad_accum_steps_is_one_line_and_nothing_is_written(jpeg_folder_4x6, tmp_path, value, message):
    r = cli_train(jpeg_folder_4x6, tmp_path / "run", "--accum-steps", value)
    assert r.exit_code == 2 and r.output.strip() == f"Error: {message}", r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_accum_steps_auto_keeps_the_micro_batch_and_says_how(jpeg_folder_4x6, tmp_path, steps):
    r = cli_train(jpeg_folder_4x6, tmp_path / "run", "--epochs", "1", "--accum-steps", "auto", "--micro-batch", "2")
    assert r.exit_code == 0, r.output
    assert ("--accum-steps auto (a micro-batch of 2 a process): each optimizer step's batch of 8 is 1 process x 4 "
            "micro-batches of 2") in r.output.splitlines(), r.output
    assert steps == [(8, 4)] * 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["accum_steps"] == 0  # auto, resolved per world


def test_a_config_file_takes_accum_steps_auto_as_the_option_does(tmp_path):
    from rmix.cli import option_changes, option_fields
    from rmix.config_file import read
    (tmp_path / "c.toml").write_text('accum_steps = "auto"\nmicro-batch = 16\n')
    assert read(tmp_path / "c.toml", option_fields()) == {"accum_steps": 0, "micro_batch": 16}
    assert option_changes({"accum_steps": "auto"}) == {"accum_steps": 0}
    assert option_changes({"accum_steps": "4"}) == {"accum_steps": 4}


@pytest.mark.slow
def test_a_resume_changes_accum_steps_only_when_allowed_and_says_what_the_history_becomes(jpeg_folder_4x6, tmp_path,
                                                                                          monkeypatch):
    out = tmp_path / "cut"
    real = cut_after_save(monkeypatch, 1, 2)
    assert isinstance(cli_train(jpeg_folder_4x6, out, "--accum-steps", "2", "--save-every-steps", "1").exception, Cut)
    monkeypatch.setattr(checkpoint, "save", real)
    r = cli_train(jpeg_folder_4x6, out, "--accum-steps", "1", "--save-every-steps", "1", "--resume", "auto")
    assert r.exit_code == 2 and "accum_steps: saved 2, now 1" in r.output, r.output
    r = cli_train(jpeg_folder_4x6, out, "--accum-steps", "1", "--save-every-steps", "1", "--resume", "auto",
                  "--allow-changes", "accum_steps")
    assert r.exit_code == 0, r.output
    # the history is a micro-batch of 4, a forward now takes the whole 8: the next step starts a history afresh
    assert ("--accum-steps 1: the saved history holds 4 images a process, a forward now takes 8; the next step "
            "pastes nothing, as an epoch's first does") in r.output, r.output


@pytest.mark.slow
def test_a_resume_without_accum_steps_goes_on_with_the_runs_own(jpeg_folder_4x6, tmp_path, monkeypatch, request):
    # the relaunch names only --resume: the run's saved --accum-steps 2 holds, not the default 1
    whole = tmp_path / "whole"
    assert cli_train(jpeg_folder_4x6, whole, "--accum-steps", "2").exit_code == 0
    out = tmp_path / "cut"
    real = cut_after_save(monkeypatch, 1, 2)
    assert isinstance(cli_train(jpeg_folder_4x6, out, "--accum-steps", "2", "--save-every-steps", "1").exception, Cut)
    monkeypatch.setattr(checkpoint, "save", real)
    steps = request.getfixturevalue("steps")  # counted from the resume on
    r = CliRunner().invoke(cli, ["train", "--out", str(out), "--resume", "auto"])
    assert r.exit_code == 0, r.output
    assert "--accum-steps 2: each optimizer step's batch of 8 is 1 process x 2 micro-batches of 4" in r.output
    assert steps and {accum for _, accum in steps} == {2}
    assert_same_run(out, whole)
