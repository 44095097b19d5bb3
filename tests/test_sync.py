"""The training step reads nothing back from the device: host syncs counted around real steps.

On a GPU every read of a device value (`.item()`, `bool(t)`, `nonzero`, ...) makes the host wait
for the queued work. The counter (rmix.syncs.SyncCounter) sees those ops as the dispatcher runs
them, on the CPU too, so a read added to the step fails here without a GPU. Reads of the policies'
host-side random draws (a CPU generator, also on a GPU run) are not device reads. Reads are told
apart by the module they come from, never by a file's path, so the suite runs wherever the
checkout and its virtual environment live.
"""
import pytest
import torch

from rmix import config as C
from rmix.engine import build_optimizer, make_policy, train_one_epoch
from rmix.guard import StepGuard, TrainingError
from rmix.models import build
from rmix.progress import Progress
from rmix.state import RunState
from rmix.syncs import SyncCounter as LibrarySyncCounter


class SyncCounter(LibrarySyncCounter):
    """rmix.syncs.SyncCounter, leaving out the reads of this module's own checks."""

    def __init__(self):
        super().__init__(ignore={__name__})


def setup(policy_name, amp, optimizer="sgd"):
    cfg = C.replace(C.with_dataset_stats(C.TrainConfig(), "folder"), model="resnet8", num_classes=4, log_every=1000,
                    amp=amp, device="cpu", **{"mix.policy": policy_name, "optim.optimizer": optimizer})
    torch.manual_seed(0)
    model = build(cfg.model, cfg.num_classes)
    if policy_name != "recursive_mix":
        model.fc_roi.requires_grad_(False)
    optimizer = build_optimizer(model, cfg.optim)
    dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    policy = make_policy(cfg, torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 4, (8,), generator=g)) for _ in range(8)]
    return cfg, model, optimizer, scaler, policy, dtype, batches


def reads_in_epoch(policy_name, amp, steps, log_every, optimizer="sgd"):
    cfg, model, optimizer, scaler, policy, dtype, batches = setup(policy_name, amp, optimizer)
    cfg = C.replace(cfg, log_every=log_every)
    with Progress(steps, "sync", enabled=False) as bar, SyncCounter() as counter:
        train_one_epoch(model, policy, batches[:steps], optimizer, scaler, cfg, RunState(), dtype, bar)
    return counter.reads


@pytest.mark.parametrize("policy_name,amp,optimizer", [
    ("recursive_mix", "none", "sgd"), ("none", "none", "sgd"), ("mixup", "none", "sgd"), ("cutmix", "none", "sgd"),
    ("recursive_mix", "bf16", "sgd"), ("recursive_mix", "fp16", "sgd"), ("recursive_mix", "none", "adamw"),
    ("recursive_mix", "fp16", "adamw")])
def test_no_host_sync_per_step(policy_name, amp, optimizer):
    # the same reads for 3 steps and for 8: the epoch end's, and none per step
    three = reads_in_epoch(policy_name, amp, 3, 1000, optimizer)
    eight = reads_in_epoch(policy_name, amp, 8, 1000, optimizer)
    assert eight == three, eight
    assert len(three) == 4 and all(where.startswith("rmix.guard:") for _, where in three), three  # the guard, at the end


def test_the_counter_sees_the_logging_steps_reads():
    # every step a logging step: the guard is read each time, and the counter sees it
    quiet, chatty = reads_in_epoch("recursive_mix", "none", 4, 1000), reads_in_epoch("recursive_mix", "none", 4, 1)
    assert len(chatty) == len(quiet) + 4 * 4, chatty  # 4 values of the guard per logging step


def test_the_counter_sees_a_read_of_a_device_value():
    guard = StepGuard(max_skipped=1)
    guard.update(0, torch.zeros(1), torch.zeros(()), fp16=False)
    with SyncCounter() as counter:
        guard.check(epoch=1)
    assert [name for name, _ in counter.reads] == ["_local_scalar_dense"] * 4


def test_a_non_finite_step_never_reaches_the_weights_and_is_reported_later(monkeypatch):
    import rmix.engine as engine
    cfg, model, optimizer, scaler, policy, dtype, batches = setup("recursive_mix", "none")
    real_loss, real_step, unchanged = engine.mix_loss, engine.train_step, []

    def poisoned(*a, **kw):  # step 1's loss is NaN, and so are its gradients
        return real_loss(*a, **kw) * (float("nan") if len(unchanged) == 1 else 1.0)

    def spy(model, *a, **kw):
        before = [p.detach().clone() for p in model.parameters()]
        r = real_step(model, *a, **kw)
        unchanged.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
        return r
    monkeypatch.setattr(engine, "mix_loss", poisoned)
    monkeypatch.setattr(engine, "train_step", spy)
    with Progress(4, "sync", enabled=False) as bar, SyncCounter() as counter, \
            pytest.raises(TrainingError, match=r"non-finite loss \(nan\) or gradients at epoch 1, step 2"):
        train_one_epoch(model, policy, batches[:4], optimizer, scaler, cfg, RunState(), dtype, bar)
    assert unchanged == [False, True, False, False]  # the 2nd step skipped on the device; the host learnt it at the end
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(counter.reads) == 4  # the guard's one read, at the end of the pass


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_a_step_skipped_on_the_device_leaves_no_trace(optimizer_name):
    # a skipped first step, then a good one == the good one alone: weights and optimizer state
    # (fused SGD would otherwise keep the uninitialized momentum of the step it skipped)
    from rmix.guard import nonfinite, step_skipping
    o = C.replace(C.TrainConfig(), **{"optim.optimizer": optimizer_name}).optim
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = build_optimizer(a, o), build_optimizer(b, o)
    x = torch.randn(5, 6)
    loss = a(x).sum() * float("nan")
    loss.backward()
    bad = nonfinite(loss, opt_a)
    step_skipping(opt_a, bad)
    opt_a.zero_grad(set_to_none=True)
    assert bad.item() == 1.0
    for model, opt in ((a, opt_a), (b, opt_b)):
        loss = model(x).square().sum()
        loss.backward()
        found = nonfinite(loss, opt)
        assert found.item() == 0.0
        step_skipping(opt, found)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for sa, sb in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), (sa, sb)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_non_fused_optimizer_skips_on_the_host(foreach):
    # a user's own SGD (single-tensor or foreach) refuses found_inf; the guard skips the call instead
    from rmix.guard import nonfinite, step_skipping
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=foreach)
    x = torch.randn(5, 6)
    loss = model(x).sum() * float("inf")
    loss.backward()
    step_skipping(opt, nonfinite(loss, opt))
    opt.zero_grad(set_to_none=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state
    loss = model(x).square().sum()
    loss.backward()
    step_skipping(opt, nonfinite(loss, opt))
    assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not hasattr(opt, "found_inf")


def test_reads_are_attributed_by_module_wherever_the_files_live():
    # a torch frame whose file lies under a checkout named rmix (the README's .venv inside it), called
    # from rmix code whose file lies elsewhere: the read is rmix's, at its line
    torch_ns, rmix_ns = {"__name__": "torch._fake"}, {"__name__": "rmix._fake_step"}
    exec(compile("def read(t):\n    return t.item()\n",
                 "/home/me/rmix/.venv/lib/python3.11/site-packages/torch/_fake.py", "exec"), torch_ns)
    exec(compile("def step(read, t):\n    return read(t)\n", "/opt/elsewhere/step.py", "exec"), rmix_ns)
    with SyncCounter() as counter:
        rmix_ns["step"](torch_ns["read"], torch.zeros(()))
    assert counter.reads == [("_local_scalar_dense", "rmix._fake_step:2 step")]


def test_the_guard_is_read_before_each_mid_epoch_save_and_only_then():
    # --save-every-steps 3 over 4 steps (no logging step): the guard at step 3, and at the pass's end
    cfg, model, optimizer, scaler, policy, dtype, batches = setup("recursive_mix", "none")
    cfg = C.replace(cfg, save_every_steps=3)
    with Progress(4, "sync", enabled=False) as bar, SyncCounter() as counter:
        train_one_epoch(model, policy, batches[:4], optimizer, scaler, cfg, RunState(), dtype, bar)
    assert len(counter.reads) == 2 * 4, counter.reads  # 4 values of the guard, twice
