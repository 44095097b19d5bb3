"""Schedules, losses, accuracy and the config tree."""

import math

import pytest
import torch
import torch.nn.functional as F

from rmix import config as C
from rmix.losses import consistency_loss, mix_loss, soft_cross_entropy, topk_correct
from rmix.schedule import lr_at


def test_warmup_matches_the_papers_logs():
    # published CIFAR logs: epoch 1 at lr 0.041667 = 0.25 / 6 with a 5-epoch warmup
    assert lr_at(1, 0.25, 300, schedule="step", warmup=5, milestones=(150, 225)) == pytest.approx(0.25 / 6)
    assert lr_at(5, 0.25, 300, schedule="step", warmup=5, milestones=(150, 225)) == pytest.approx(0.25 * 5 / 6)


@pytest.mark.parametrize("epoch,factor", [(6, 1), (150, 1), (151, 0.1), (225, 0.1), (226, 0.01), (300, 0.01)])
def test_step_schedule(epoch, factor):
    assert lr_at(epoch, 0.25, 300, schedule="step", warmup=5, milestones=(150, 225)) == pytest.approx(0.25 * factor)


def test_cosine_schedule_is_the_papers_and_cos_prefix_restarts_after_warmup():
    lrs = [lr_at(e, 0.2, 300, schedule="cos", warmup=5) for e in range(1, 301)]
    assert lrs[5] == pytest.approx(0.1 * (1 + math.cos(math.pi * 5 / 300)))  # below the peak: no restart
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert 0 < lrs[-1] < 0.2 * 1e-3
    assert lr_at(1, 0.1, 10) == pytest.approx(0.1)  # no warmup: first epoch at the peak
    prefix = [lr_at(e, 0.2, 300, schedule="cos_prefix", warmup=5) for e in range(1, 301)]
    assert prefix[:5] == lrs[:5] and prefix[5] == pytest.approx(0.2)
    assert all(p > c for p, c in zip(prefix[5:], lrs[5:]))  # the shifted variant runs higher in 295 epochs
    # without warmup both are the same curve
    assert [lr_at(e, 0.1, 30, schedule="cos_prefix") for e in range(1, 31)] == \
        pytest.approx([lr_at(e, 0.1, 30, schedule="cos") for e in range(1, 31)])


def test_lr_at_rejects_bad_epoch():
    with pytest.raises(ValueError, match="epoch"):
        lr_at(0, 0.1, 10)


def test_soft_cross_entropy_equals_cross_entropy_for_one_hot_and_smoothing():
    logits = torch.randn(6, 5)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(soft_cross_entropy(logits, F.one_hot(t, 5).float()), F.cross_entropy(logits, t))
    smoothed = F.one_hot(t, 5).float() * 0.9 + 0.1 / 5
    assert torch.allclose(soft_cross_entropy(logits, smoothed), F.cross_entropy(logits, t, label_smoothing=0.1))


def test_consistency_loss_weights_by_pasted_area():
    roi, prev = torch.randn(4, 3), torch.randn(4, 3)
    ce = -(F.softmax(prev, -1) * F.log_softmax(roi, -1)).sum(-1)
    lam = torch.full((4,), 0.75)
    assert torch.allclose(consistency_loss(roi, prev, lam, 0.5), 0.5 * 0.25 * ce.mean())
    assert consistency_loss(roi, prev, torch.ones(4), 0.5) == 0


def test_mix_loss_keeps_roi_in_graph_with_zero_weight():
    logits = torch.randn(3, 4, requires_grad=True)
    roi = torch.randn(3, 4, requires_grad=True)
    soft = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    loss = mix_loss(logits, roi, soft, None, torch.ones(3), 0.5)
    loss.backward()
    assert roi.grad is not None and torch.all(roi.grad == 0)
    assert torch.allclose(loss, soft_cross_entropy(logits, soft))


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    t = torch.tensor([1, 2, 0])
    c1, c5 = topk_correct(logits, t)
    assert c1 == 1 and c5 == 3  # top-5 caps at K = 3
    c1, c2 = topk_correct(logits, t, ks=(1, 2))
    assert c2 == 2


def test_config_roundtrip_and_dotted_replace():
    cfg = C.replace(C.TrainConfig(), **{"mix.alpha": 0.3, "optim.milestones": (150, 225), "epochs": 7})
    assert cfg.mix.alpha == 0.3 and cfg.epochs == 7
    assert C.from_dict(C.to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown field 'bogus'"):
        C.from_dict({**C.to_dict(cfg), "bogus": 1})


@pytest.mark.parametrize("change,option", [
    ({"mix.policy": "bogus"}, "--aug"), ({"epochs": 0}, "--epochs"), ({"batch_size": -1}, "--batch-size"),
    ({"mix.alpha": 1.5}, "--aug-alpha"), ({"mix.alpha": 0.0}, "--aug-alpha"), ({"mix.omega": -0.1}, "--aug-omega"),
    ({"optim.lr": 0}, "--lr"), ({"optim.warmup": 20, "epochs": 10}, "--warmup"), ({"mix.smoothing": 1.0}, "--smoothing"),
    ({"data.val_resize": 8}, "--val-resize"), ({"data.min_area": 0}, "--min-area"),
])
def test_validate_names_the_option(change, option):
    with pytest.raises(ValueError, match=option):
        C.validate(C.replace(C.TrainConfig(), **change))


def test_mixup_alpha_above_one_is_valid():
    C.validate(C.replace(C.TrainConfig(), **{"mix.policy": "mixup", "mix.alpha": 2.0}))


@pytest.mark.parametrize("bad,name", [
    (dict(soft_targets=torch.full((4, 7), 1 / 7)), "soft_targets"), (dict(soft_targets=torch.tensor([0, 1, 2, 3])),
                                                                      "soft_targets"),
    (dict(prev_logits=torch.zeros(3, 10)), "prev_logits"), (dict(lam=torch.ones(3)), "lam"),
    (dict(logits=torch.zeros(10)), "logits"), (dict(omega=float("nan")), "omega"), (dict(roi_logits=torch.zeros(4, 7)),
                                                                                     "roi_logits"),
    (dict(lam=1.5), "lam"), (dict(lam=torch.tensor([0.5, 0.5, -0.1, 0.5])), "lam"),  # values: read on the CPU
    (dict(lam=torch.tensor(float("nan"))), "lam"), (dict(soft_targets=torch.full((4, 10), 0.1) - 0.2), "soft_targets")])
def test_mix_loss_names_the_argument_that_is_not_the_batchs(bad, name):
    from rmix.losses import mix_loss
    args = dict(logits=torch.zeros(4, 10), roi_logits=torch.zeros(4, 10), soft_targets=torch.full((4, 10), 0.1),
                prev_logits=torch.zeros(4, 10), lam=torch.full((4,), 0.5), omega=0.5)
    args.update(bad)
    with pytest.raises(ValueError, match=f"^{name}: "):
        mix_loss(**args)


def test_mix_loss_takes_lam_as_a_number():
    from rmix.losses import mix_loss
    a = dict(logits=torch.randn(4, 10), roi_logits=torch.randn(4, 10), soft_targets=torch.full((4, 10), 0.1),
             prev_logits=torch.randn(4, 10), omega=0.5)
    torch.testing.assert_close(mix_loss(**a, lam=0.25), mix_loss(**a, lam=torch.full((4,), 0.25)))


@pytest.mark.parametrize("prev", [False, True])
def test_mix_loss_refuses_an_empty_batch(prev):
    # was NaN, silently: the mean over no images (the trainer's training batches are never empty)
    empty = torch.zeros(0, 10, requires_grad=True)
    with pytest.raises(ValueError, match=r"^logits: an empty batch \(0, 10\)"):
        mix_loss(empty, empty if prev else None, torch.zeros(0, 10), empty if prev else None, torch.ones(0), 0.5)
    with pytest.raises(ValueError, match=r"^logits: an empty batch"):  # a shape: refused without reading values
        mix_loss(empty, None, torch.zeros(0, 10), None, torch.ones(0), 0.5, check_values=False)


def test_mix_loss_refuses_soft_targets_whose_rows_do_not_sum_to_one():
    # rows summing to 3 weighed the loss 3 times; RecursiveMix refuses such targets
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"^soft_targets: expected rows summing to 1 \(within 0.001\), got row sums "
                                         r"from 3 to 3"):
        mix_loss(logits, None, torch.full((4, 10), 0.3), None, torch.ones(4), 0.5)
    half = torch.full((4, 10), 0.1)
    half[2] = 0.05
    with pytest.raises(ValueError, match="^soft_targets: .* from 0.5 to 1"):
        mix_loss(logits, None, half, None, torch.ones(4), 0.5)
    near = torch.full((4, 10), 0.1 + 5e-5)  # float sums within the tolerance
    torch.testing.assert_close(mix_loss(logits, None, near, None, torch.ones(4), 0.5),
                               soft_cross_entropy(logits, near))
    mix_loss(logits, None, torch.full((4, 10), 0.3), None, torch.ones(4), 0.5, check_values=False)  # the trainer's
