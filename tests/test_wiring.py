"""Every setting reaches the place where it acts, checked there against a hand computation, with values
that differ from each other and from the defaults (a setting wired from the wrong field fails here)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rmix import config as C
from rmix import engine
from rmix.engine import build_optimizer, make_normalize, make_policy, train_one_epoch
from rmix.mixing import CutMix, Mixup, RecursiveMix
from rmix.models import build
from rmix.progress import Progress
from rmix.state import RunState

# distinct from each other and from the defaults (alpha 0.5, omega 0.5, nearest, ...)
MIX = {"mix.alpha": 0.3, "mix.omega": 0.1, "mix.interpolate": "bilinear", "mix.per_sample": True,
       "mix.smoothing": 0.2, "mix.smoothing_form": "uniform"}


def config(**changes):
    base = C.replace(C.with_dataset_stats(C.TrainConfig(), "folder"), model="resnet8", num_classes=5, device="cpu",
                     log_every=1000, seed=7)
    return C.replace(base, **changes)


def test_make_policy_hands_every_mix_setting_to_the_policy():
    assert C.TrainConfig().mix.alpha == 0.5 and C.TrainConfig().mix.omega == 0.5  # the defaults the values avoid
    policy = make_policy(config(**MIX), torch.device("cpu"), None)
    assert isinstance(policy, RecursiveMix)
    assert (policy.alpha, policy.omega, policy.interpolate, policy.per_sample) == (0.3, 0.1, "bilinear", True)
    assert (policy.smoothing, policy.smoothing_form) == (0.2, "uniform")
    # evaluation's targets are never smoothed: its loss is the plain cross-entropy, whatever mix.smoothing says
    normalize = make_normalize(config(**MIX), torch.device("cpu"), None)
    model = build("resnet8", 5).eval()
    images, targets = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        plain = F.cross_entropy(model(normalize(images)), targets).item()
    assert engine.evaluate(model, [(images, targets)], normalize, None)["loss"] == pytest.approx(plain, rel=1e-6)
    for name, cls in (("mixup", Mixup), ("cutmix", CutMix)):
        p = make_policy(config(**{**MIX, "mix.policy": name}), torch.device("cpu"), None)
        assert isinstance(p, cls) and p.alpha == 0.3 and p.smoothing == 0.2


def test_alpha_bounds_the_pasted_area_and_per_sample_draws_one_box_per_image():
    policy = make_policy(config(**MIX), torch.device("cpu"), None)
    boxes = torch.cat([policy.sample_boxes(8, 64, 64) for _ in range(200)])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).double() / (64 * 64)
    assert area.max() <= 0.3 + 1e-9 and area.max() > 0.25  # sqrt(U(0, 0.3)) sides: up to 0.3, not 0.5 or 0.1
    assert len({tuple(b.tolist()) for b in boxes[:8]}) > 1  # one box per image, not one per batch


def test_smoothing_and_its_form_reach_the_targets():
    policy = make_policy(config(**MIX), torch.device("cpu"), None)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    out = policy(images, torch.tensor([0, 1, 2, 3]))  # the first step: nothing pasted, targets only smoothed
    # uniform form: 1 - s + s / K on the class, s / K elsewhere (K = 5, s = 0.2)
    want = torch.full((4, 5), 0.2 / 5)
    want[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1 - 0.2 + 0.2 / 5
    torch.testing.assert_close(out.soft_targets, want)


def run_epochs(cfg, epochs=2, steps=4, n=6):
    """train_one_epoch over in-memory batches, epoch after epoch, as `train` runs it; returns what
    mix_loss was given and returned, and the policy's outputs, step by step."""
    torch.manual_seed(0)
    model = build(cfg.model, cfg.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    policy = make_policy(cfg, torch.device("cpu"), None)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, cfg.num_classes, (n,), generator=g)) for _ in range(steps)]
    calls, outs = [], []
    real_loss, real_call = engine.mix_loss, type(policy).__call__

    def loss_spy(*args, **kw):
        loss = real_loss(*args, **kw)
        calls.append((*[a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args], loss.detach()))
        return loss

    def call_spy(self, images, targets, *a, **kw):
        out = real_call(self, images, targets, *a, **kw)
        outs.append((images.clone(), out.images.detach().clone(), out.lam.clone(), out.boxes.clone()))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "mix_loss", loss_spy)
        mp.setattr(type(policy), "__call__", call_spy)
        for epoch in range(1, epochs + 1):
            with Progress(steps, "test", enabled=False) as bar:
                train_one_epoch(model, policy, batches, optimizer, scaler, cfg, RunState(epoch=epoch), None, bar)
    return calls, outs, policy


def test_omega_weights_the_consistency_loss_as_the_paper_computes_it():
    cfg = config(**MIX)
    calls, _, _ = run_epochs(cfg, epochs=1)
    with_history = 0
    for logits, roi_logits, soft, prev_logits, lam, omega, loss in calls:
        ce = -(soft * F.log_softmax(logits.float(), -1)).sum(-1).mean()
        if prev_logits is None:  # the first step: nothing pasted, nothing to be consistent with
            torch.testing.assert_close(loss, ce)
            continue
        with_history += 1
        target = F.softmax(prev_logits.float(), -1)
        roi_ce = -(target * F.log_softmax(roi_logits.float(), -1)).sum(-1)
        want = ce + 0.1 * ((1 - lam) * roi_ce).mean()  # omega = 0.1: the setting, not alpha or the default
        torch.testing.assert_close(loss, want)
        assert omega == 0.1
    assert with_history == 3


def test_each_epochs_first_batch_is_unmixed_and_the_rest_mix():
    # the default configuration: the history is cleared at every epoch start, as the paper's code does
    cfg = config()
    _, outs, policy = run_epochs(cfg, epochs=3, steps=4)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    for step, (images, mixed, lam, boxes) in enumerate(outs):
        if step % 4 == 0:  # an epoch's first batch: its own pixels, normalized, and nothing else
            assert torch.equal(lam, torch.ones_like(lam)) and not boxes.any()
            torch.testing.assert_close(mixed, (images.permute(0, 3, 1, 2).float() - mean) / std)
        else:
            assert (lam < 1).any() and boxes.any(), step  # the others paste the previous batch
    assert len(outs) == 12


def test_the_epochs_learning_rate_is_the_schedules():
    # milestones, gamma and warmup reach the optimizer: lr * gamma ** (milestones passed), the paper's rule
    cfg = config(**{"optim.schedule": "step", "optim.milestones": (2, 3), "optim.gamma": 0.3, "optim.lr": 0.2,
                    "optim.warmup": 1}, epochs=4)
    model = build(cfg.model, cfg.num_classes)
    opt = build_optimizer(model, cfg.optim)
    got = [engine.set_lr(opt, cfg, e) for e in range(1, 5)]
    assert got == pytest.approx([0.2 * 1 / 2, 0.2, 0.2 * 0.3, 0.2 * 0.3 ** 2])
    assert all(g["lr"] == pytest.approx(got[-1]) for g in opt.param_groups)
    cos = config(**{"optim.schedule": "cos", "optim.lr": 0.2}, epochs=4)
    assert [engine.set_lr(opt, cos, e) for e in (1, 3)] == pytest.approx([0.2, 0.2 * 0.5 * (1 + math.cos(math.pi / 2))])


# --- what the mutation run found untested in the engine's step and epoch ---

def epoch_of(cfg, batches, hits=None, state=None, **kw):
    """train_one_epoch over `batches`: (its sums, each step's loss); `hits`, a list, gets each step's
    count of images whose largest logit is their largest target share, counted here."""
    torch.manual_seed(0)
    model = build(cfg.model, cfg.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    dtype = {"auto": None, "none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.amp]  # auto: fp32 on a CPU
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    policy = make_policy(cfg, torch.device("cpu"), dtype)
    losses, real, hits = [], engine.mix_loss, [] if hits is None else hits

    def spy(*a, **kw):
        loss = real(*a, **kw)
        losses.append(loss.detach().double())
        logits, soft = a[0].detach(), a[2]
        hits.append(sum(int(logits[i].argmax() == soft[i].argmax()) for i in range(len(logits))))
        return loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "mix_loss", spy)
        with Progress(len(batches), "test", enabled=False) as bar:
            sums = train_one_epoch(model, policy, batches, optimizer, scaler, cfg, state or RunState(), dtype, bar, **kw)
    return sums, losses


def test_the_epochs_sums_are_the_steps_losses_times_their_images_and_the_images_counted():
    cfg = config()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 256, (n, 16, 16, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (n,), generator=g)) for n in (6, 6, 3)]  # a short last batch
    hits = []
    sums, losses = epoch_of(cfg, batches, hits)
    assert sums.shape == (3,) and sums[2].item() == 15  # images, not pixels or channels
    torch.testing.assert_close(sums[0], sum(loss * n for loss, n in zip(losses, (6, 6, 3))))
    assert sums[1].item() == sum(hits) and 0 < sums[1].item() < 15  # train top-1's count, by hand


def test_a_loader_shorter_than_its_length_ends_the_epoch_and_a_stepless_epoch_sums_to_nothing():
    class Short(list):
        def __len__(self):  # says 5, yields 2 (a rank whose reader ran out early)
            return 5
    cfg = config()
    g = torch.Generator().manual_seed(3)
    batches = Short((torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g),
                     torch.randint(0, 5, (4,), generator=g)) for _ in range(2))
    sums, losses = epoch_of(cfg, batches)
    assert len(losses) == 2 and sums[2].item() == 8
    sums, losses = epoch_of(cfg, list(batches), state=RunState(step=2))  # resumed at its end: no step left
    assert losses == [] and sums.tolist() == [0.0, 0.0, 0.0]


def test_fp16_steps_that_do_not_overflow_are_not_counted_as_skipped():
    # GradScaler's scale only falls when it skips: more steps than --max-skipped-steps, none of them bad
    cfg = config(amp="fp16", max_skipped_steps=3)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (4,), generator=g)) for _ in range(6)]
    sums, losses = epoch_of(cfg, batches)
    assert len(losses) == 6 and sums[2].item() == 24


def test_policies_write_nchw_on_the_cpu_whatever_channels_last_says():
    cfg = config(channels_last=True)
    policy, normalize = make_policy(cfg, torch.device("cpu"), None), make_normalize(cfg, torch.device("cpu"), None)
    assert not policy.channels_last and not normalize.channels_last  # channels_last is for CUDA runs only
    policy = make_policy(config(channels_last=True), torch.device("cuda", 0), None)
    assert policy.channels_last


def test_the_optimizer_is_the_one_configured_with_its_settings():
    model = build("resnet8", 5)
    sgd = build_optimizer(model, config(**{"optim.lr": 0.3, "optim.momentum": 0.8, "optim.nesterov": False,
                                           "optim.weight_decay": 1e-3}).optim)
    assert type(sgd) is torch.optim.SGD
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"], g["fused"]) == (0.3, 0.8, False, 1e-3, True)
    adamw = build_optimizer(model, config(**{"optim.optimizer": "adamw", "optim.lr": 0.002,
                                             "optim.weight_decay": 0.05}).optim)
    assert type(adamw) is torch.optim.AdamW
    assert (adamw.param_groups[0]["lr"], adamw.param_groups[0]["weight_decay"]) == (0.002, 0.05)
    frozen = build("resnet8", 5)
    frozen.fc_roi.requires_grad_(False)  # --aug none: the RoI head is not trained
    n = sum(len(g["params"]) for g in build_optimizer(frozen, config().optim).param_groups)
    assert n == sum(p.requires_grad for p in frozen.parameters())


def test_the_default_rank_is_rank_zero_and_shared_boxes_share_one_stream():
    cfg = config(**MIX)
    draws = {}
    for rank in (None, 0, 1):
        policy = make_policy(cfg, torch.device("cpu"), None, **({} if rank is None else {"rank": rank}))
        draws[rank] = policy.sample_boxes(4, 32, 32)
    assert torch.equal(draws[None], draws[0]) and not torch.equal(draws[0], draws[1])
    shared = C.replace(cfg, **{"mix.shared_boxes": True})
    a = make_policy(shared, torch.device("cpu"), None, rank=0)
    b = make_policy(shared, torch.device("cpu"), None, rank=3)
    assert torch.equal(a.sample_boxes(4, 32, 32), b.sample_boxes(4, 32, 32))


def test_to_cpu_moves_tensors_and_keeps_every_other_value():
    # a policy's state dict: tensors (CUDA ones in a real run) beside plain values such as None
    from rmix.state import _to_cpu
    state = {"history": torch.ones(2, 3), "prev_logits": None, "count": 3}
    out = _to_cpu(state)
    assert out.keys() == state.keys() and out["prev_logits"] is None and out["count"] == 3
    assert torch.equal(out["history"], state["history"]) and out["history"].device.type == "cpu"


@pytest.mark.parametrize("bad", [["a/x.jpg"], []])
def test_a_batch_that_cannot_decode_stops_the_epoch_naming_its_files(bad):
    from rmix.guard import TrainingError
    from rmix.pipelines import DecodeError

    def batches():
        yield torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8), torch.randint(0, 5, (4,))
        raise DecodeError(1, 1, ["a/x.jpg", "b/y.jpg"], bad, "corrupt JPEG")
    with pytest.raises(TrainingError) as e:
        epoch_of(config(), list_like(batches(), 2))
    which = "a/x.jpg" if bad else "one of 2 files"
    assert str(e.value).startswith(f"cannot decode {which} at epoch 1, step 2 (corrupt JPEG)"), str(e.value)


class list_like:
    """An iterator with a length, as a loader is."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return self.it

    def __len__(self):
        return self.n


@pytest.mark.parametrize("momentum,dampening,zeroed", [(0.9, 0.0, True), (0.9, 0.5, False), (0.0, 0.0, False)])
def test_momentum_buffers_are_zeroed_only_where_the_first_step_would_equal_a_zero_buffer(momentum, dampening, zeroed):
    # with dampening the first step is buf = grad, not momentum * 0 + (1 - dampening) * grad; without momentum no buffer
    from rmix.optim import init_momentum
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=momentum, dampening=dampening)
    init_momentum(opt)
    assert ("momentum_buffer" in opt.state[w]) == zeroed


def test_the_stop_check_is_told_the_epochs_last_step_only_there():
    # under DDP the flag is all-reduced every `every` steps and at the last step: `last` must mark that one
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g),
                torch.randint(0, 5, (4,), generator=g)) for _ in range(4)]
    calls = []
    epoch_of(config(), batches, stop=lambda done, last=False: calls.append((done, last)) and False)
    assert calls == [(1, False), (2, False), (3, False), (4, True)]


@pytest.mark.parametrize("amp,dtype", [(None, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_the_policy_hands_the_model_images_in_the_autocast_dtype(amp, dtype):
    cfg = config()
    policy, normalize = make_policy(cfg, torch.device("cpu"), amp), make_normalize(cfg, torch.device("cpu"), amp)
    images, targets = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8), torch.tensor([0, 1, 2, 3])
    assert policy(images, targets).images.dtype == dtype and normalize(images).dtype == dtype
