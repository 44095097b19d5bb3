"""Mixing policies: parity with the paper's procedure, and properties."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmix.losses import mix_loss
from rmix.mixing import CutMix, Mixup, NoMix, RecursiveMix, build_policy, roi_boxes, sample_beta
from rmix.models import build

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 50.0, 70.0)
K = 5


def batch(n, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, K, (n,), generator=g))


def normalized(images):
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() - m) / s


def paper_loop(steps, model, omega, mode):
    """The paper's training-step mixing, as literally as DESIGN.md states it (loop locals)."""
    old_inputs = old_targets = old_out = None
    results = []
    for step in steps:
        if step == "reset":  # epoch start
            old_inputs = old_targets = old_out = None
            continue
        (images, labels), (x1, y1, x2, y2) = step
        inputs = normalized(images)  # the loader normalizes
        targets = F.one_hot(labels, K).float()
        bs, _, H, W = inputs.shape
        lam, roi = 1.0, None
        if old_inputs is not None:
            if x2 - x1 > 0 and y2 - y1 > 0:
                kw = {} if mode == "nearest" else {"align_corners": True}
                inputs[:, :, y1:y2, x1:x2] = F.interpolate(old_inputs[:bs], size=(y2 - y1, x2 - x1), mode=mode, **kw)
                roi = (x1, y1, x2, y2)
            lam = 1 - (x2 - x1) * (y2 - y1) / (W * H)
            targets = lam * targets + (1 - lam) * old_targets[:bs]
        boxes = torch.tensor([roi if roi else (0, 0, W, H)] * bs)
        logits, roi_logits = model(inputs, boxes)
        loss = -(targets * F.log_softmax(logits, 1)).sum(1).mean()
        if old_out is not None:
            cons = -(F.softmax(old_out[:bs], 1) * F.log_softmax(roi_logits, 1)).sum(1).mean()
            loss = loss + omega * (1 - lam) * cons
        old_inputs, old_targets, old_out = inputs.clone().detach(), targets.clone(), logits.detach()
        results.append((inputs, targets, lam, roi, loss))
    return results


def rmix_loop(steps, model, omega, mode):
    policy = RecursiveMix(K, alpha=0.5, omega=omega, interpolate=mode, mean=MEAN, std=STD)
    results = []
    for step in steps:
        if step == "reset":
            policy.reset()
            continue
        (images, labels), box = step
        n, h, w = images.shape[:3]
        out = policy(images, labels, boxes=torch.tensor([box] * n))
        logits, roi_logits = model(out.images, roi_boxes(out, h, w))
        loss = mix_loss(logits, roi_logits, out.soft_targets, policy.prev_logits, out.lam, omega)
        policy.remember(out.images, out.soft_targets, logits)
        b = out.boxes[0].tolist()
        results.append((out.images.clone(), out.soft_targets, out.lam, b if b[2] > b[0] and b[3] > b[1] else None, loss))
    return results


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_parity_with_the_papers_procedure(mode):
    torch.manual_seed(0)
    model = build("resnet8", K)
    h, w = 10, 14  # non-square: the paper's code crashes on a zero-area box here, we paste nothing
    steps = [
        (batch(4, h, w, 1), (0, 0, 3, 3)),      # first step: no history, box ignored
        (batch(4, h, w, 2), (3, 2, 9, 7)),
        (batch(4, h, w, 3), (5, 4, 5, 9)),      # zero width: nothing pasted, lam = 1
        (batch(4, h, w, 4), (0, 6, 14, 10)),    # touches three borders
        (batch(3, h, w, 5), (8, 0, 14, 4)),     # short last batch
        "reset",
        (batch(4, h, w, 6), (1, 1, 8, 8)),      # no history after the reset
        (batch(4, h, w, 7), (2, 3, 13, 10)),
    ]
    want, got = paper_loop(steps, model, 0.5, mode), rmix_loop(steps, model, 0.5, mode)
    assert len(want) == len(got)
    tol = dict(rtol=0, atol=0) if mode == "nearest" else dict(rtol=1e-5, atol=1e-5)
    for i, ((wi, wt, wl, wr, wloss), (gi, gt, gl, gr, gloss)) in enumerate(zip(want, got)):
        torch.testing.assert_close(gi, wi, **tol, msg=f"images at step {i}")
        torch.testing.assert_close(gt, wt, rtol=1e-6, atol=1e-6, msg=f"soft targets at step {i}")
        assert torch.allclose(gl, torch.full_like(gl, wl), atol=1e-7), f"lam at step {i}"
        assert gr == (list(wr) if wr else None), f"roi box at step {i}"
        torch.testing.assert_close(gloss, wloss, rtol=1e-5, atol=1e-5, msg=f"loss at step {i}")


def test_empty_history_is_normalization():
    images, labels = batch(3, 8, 9, 0)
    out = RecursiveMix(K, mean=MEAN, std=STD)(images, labels)
    torch.testing.assert_close(out.images, normalized(images), rtol=0, atol=0)
    assert torch.equal(out.soft_targets, F.one_hot(labels, K).float())
    assert torch.all(out.lam == 1) and torch.all(out.boxes == 0)


def test_lam_is_one_minus_box_area_and_targets_sum_to_one():
    policy = RecursiveMix(K, alpha=1.0, per_sample=True, mean=MEAN, std=STD,
                          generator=torch.Generator().manual_seed(3))
    policy.remember(normalized(batch(6, 12, 16, 1)[0]), torch.softmax(torch.randn(6, K), 1), torch.randn(6, K))
    for seed in range(5):
        out = policy(*batch(6, 12, 16, seed))
        b = out.boxes
        area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).float()
        torch.testing.assert_close(out.lam, 1 - area / (12 * 16))
        torch.testing.assert_close(out.soft_targets.sum(1), torch.ones(6))
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 16).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 12).all()
        policy.remember(out.images, out.soft_targets, torch.randn(6, K))


def test_remember_detaches_and_reset_clears():
    policy = RecursiveMix(K, mean=MEAN, std=STD)
    x = torch.randn(2, 3, 8, 8, requires_grad=True) * 2
    logits = torch.randn(2, K, requires_grad=True) * 1
    policy.remember(x, torch.full((2, K), 1 / K, requires_grad=True), logits)
    assert not policy.history.requires_grad and not policy.history_logits.requires_grad
    assert not policy.history_targets.requires_grad
    policy.reset()
    assert policy.history is None and policy.history_logits is None


def test_short_last_batch_still_mixes_and_label_smoothing_applies_first():
    policy = RecursiveMix(K, alpha=1.0, smoothing=0.1, mean=MEAN, std=STD)
    first = policy(*batch(4, 8, 8, 0))
    policy.remember(first.images, first.soft_targets, torch.randn(4, K))
    images, labels = batch(2, 8, 8, 1)
    out = policy(images, labels, boxes=torch.tensor([[0, 0, 4, 4]] * 2))
    assert out.images.shape == (2, 3, 8, 8)
    smoothed = F.one_hot(labels, K).float() * 0.9 + (1 - F.one_hot(labels, K).float()) * 0.1 / (K - 1)  # the paper's
    torch.testing.assert_close(out.soft_targets, 0.75 * smoothed + 0.25 * first.soft_targets[:2])
    assert policy.prev_logits.shape == (2, K)


def test_output_buffer_alternates_without_clobbering_history():
    policy = RecursiveMix(K, alpha=1.0, mean=MEAN, std=STD)
    outs = []
    for seed in range(4):
        out = policy(*batch(3, 8, 8, seed), boxes=torch.tensor([[0, 0, 4, 4]] * 3))
        saved = out.images.clone()
        policy.remember(out.images, out.soft_targets, torch.randn(3, K))
        outs.append((out.images, saved))
    # step t's buffer is step t+1's history: it must be intact when step t+1 reads it
    assert outs[1][0].data_ptr() != outs[2][0].data_ptr()
    assert outs[0][0].data_ptr() == outs[2][0].data_ptr()  # two buffers alternate, no clone
    torch.testing.assert_close(outs[3][0], outs[3][1])


def test_box_side_distribution_matches_sqrt_uniform():
    """Two-sample KS test: rmix's clipped box areas vs the paper's numpy procedure, n = 20000."""
    alpha, H, W, n = 0.5, 64, 48, 20000
    policy = RecursiveMix(K, alpha=alpha, per_sample=True, generator=torch.Generator().manual_seed(0))
    b = policy.sample_boxes(n, H, W)
    ours = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).double().numpy() / (H * W)
    rng = np.random.default_rng(1)
    r = np.sqrt(rng.uniform(0, alpha, n))
    cw, ch = (W * r).astype(int), (H * r).astype(int)
    cx, cy = rng.integers(W, size=n), rng.integers(H, size=n)
    x1, x2 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
    y1, y2 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
    theirs = (x2 - x1) * (y2 - y1) / (H * W)
    grid = np.union1d(ours, theirs)
    d = np.max(np.abs(np.searchsorted(np.sort(ours), grid, "right") / n
                      - np.searchsorted(np.sort(theirs), grid, "right") / n))
    assert d < 1.95 * math.sqrt(2 / n), f"KS statistic {d:.4f}"  # p > 0.001
    assert ours.max() <= alpha + 1e-9
    # and the unclipped side really is sqrt(U(0, alpha)): mean of r^2 is alpha / 2
    side = (b[:, 2] - b[:, 0]).double()
    inner = (b[:, 0] > 0) & (b[:, 2] < W)
    assert side[inner].max() <= W * math.sqrt(alpha)


def test_one_box_per_batch_by_default():
    policy = RecursiveMix(K, generator=torch.Generator().manual_seed(0))
    b = policy.sample_boxes(7, 32, 32)
    assert (b == b[0]).all()


def test_mixup_label_weights_match_pixel_weights():
    images, _ = batch(5, 6, 7, 0)
    labels = torch.arange(5)  # distinct labels reveal the permutation
    out = Mixup(K, alpha=1.0, mean=MEAN, std=STD, generator=torch.Generator().manual_seed(2))(images, labels)
    lam = out.lam[0].item()
    x = normalized(images)
    partner = [int(row.clone().index_fill_(0, labels[i], 0).argmax()) if lam < 1 else i
               for i, row in enumerate(out.soft_targets)]
    for i, j in enumerate(partner):
        w_self = out.soft_targets[i, i].item() if i != j else 1.0
        torch.testing.assert_close(out.images[i], w_self * x[i] + (1 - w_self) * x[j], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.soft_targets.sum(1), torch.ones(5))


def test_cutmix_label_weights_match_pixel_weights():
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    images = torch.stack([torch.full((16, 20, 3), 10 * i, dtype=torch.uint8) for i in range(6)])  # one value each
    x = normalized(images)
    for seed in range(4):
        out = CutMix(K, alpha=1.0, mean=MEAN, std=STD, generator=torch.Generator().manual_seed(seed))(images, labels)
        for i in range(6):
            px = out.images[i, 0].flatten()
            values = {round(v, 4) for v in px.tolist()}
            assert len(values) <= 2
            own = (px == x[i, 0, 0, 0]).float().mean().item()  # fraction of own pixels
            other = [j for j in range(6) if (px == x[j, 0, 0, 0]).any() and j != i]
            want = own * F.one_hot(labels[i], K).float()
            if other:
                want = want + (1 - own) * F.one_hot(labels[other[0]], K).float()
            else:
                assert own == 1.0
                want = F.one_hot(labels[i], K).float()
            torch.testing.assert_close(out.soft_targets[i], want, rtol=1e-6, atol=1e-6)
            if other:
                assert out.lam[i].item() == pytest.approx(own, abs=1e-6)


def test_sample_beta_is_beta():
    g = torch.Generator().manual_seed(0)
    for a in (0.2, 1.0, 2.0):
        s = np.array([sample_beta(a, g) for _ in range(4000)])
        assert s.min() >= 0 and s.max() <= 1
        assert abs(s.mean() - 0.5) < 0.03
        assert abs(s.var() - 1 / (4 * (2 * a + 1))) < 0.01


def test_nomix_and_bad_inputs():
    images, labels = batch(2, 5, 5, 0)
    out = NoMix(K, mean=MEAN, std=STD)(images, labels)
    assert torch.all(out.lam == 1)
    with pytest.raises(ValueError, match="4 dims"):
        NoMix(K, mean=MEAN, std=STD)(images[0], labels)
    with pytest.raises(ValueError, match="targets"):
        NoMix(K, mean=MEAN, std=STD)(images, torch.zeros(2, K + 1))
    with pytest.raises(ValueError, match="alpha"):
        RecursiveMix(K, alpha=1.5)
    with pytest.raises(ValueError, match="aug"):
        build_policy("mixmix", K, alpha=1.0)


@pytest.mark.parametrize("policy", [NoMix, Mixup, CutMix, RecursiveMix])
def test_float_or_out_of_range_labels_are_refused(policy):
    images, _ = batch(3, 6, 6, 0)
    mix = policy(K, alpha=0.5, mean=MEAN, std=STD)
    for labels, needle in ((torch.tensor([0.7, 1.0, 2.0]), "integers"), (torch.tensor([0, K, 1]), f"\\[0, {K}\\)"),
                           (torch.tensor([-1, 0, 1]), f"\\[0, {K}\\)"), (torch.tensor([0, 1]), "batch of 3"),
                           (torch.full((3, K), 0.5), "sum"), (torch.ones(3, K, dtype=torch.long), "floats")):
        with pytest.raises(ValueError, match=needle):
            mix(images, labels)
    out = mix(images, torch.tensor([0, K - 1, 2]))  # a refused batch leaves nothing half done
    assert torch.allclose(out.soft_targets.sum(1), torch.ones(3))


def test_probability_targets_still_mix():
    images, labels = batch(3, 6, 6, 0)
    probs = F.one_hot(labels, K).float() * 0.5 + 0.5 / K
    out = RecursiveMix(K, mean=MEAN, std=STD)(images, probs)
    assert torch.allclose(out.soft_targets, probs)


def test_non_positive_std_is_refused():
    from rmix.kernels import recursive_mix
    images, labels = batch(2, 5, 5, 0)
    for std in ((60.0, 0.0, 70.0), (60.0, -1.0, 70.0)):
        with pytest.raises(ValueError, match="std: must be positive"):
            NoMix(K, mean=MEAN, std=std)
        with pytest.raises(ValueError, match="std: must be positive"):
            recursive_mix(images, None, labels, None, None, num_classes=K, mean=MEAN, std=std)


def test_a_second_call_without_remember_is_an_error():
    rm = RecursiveMix(K, mean=MEAN, std=STD)
    images, labels = batch(4, 8, 8, 0)
    out = rm(images, labels)
    with pytest.raises(RuntimeError, match=r"remember\("):
        rm(images, labels)  # before: mixed with no history, silently
    rm.remember(out.images, out.soft_targets, None)
    out = rm(images, labels)
    assert (out.lam < 1).any()  # the remembered batch is pasted
    rm.reset()  # an epoch boundary starts over
    rm(images, labels)


def test_label_values_are_read_only_on_the_host():
    from rmix.mixing import check_targets
    check_targets(torch.empty(3, dtype=torch.long, device="meta"), K)  # reading a meta tensor would raise
    check_targets(torch.empty(3, K, device="meta"), K)
    with pytest.raises(ValueError, match="integers"):  # the dtype is checked everywhere
        check_targets(torch.empty(3, device="meta"), K)


def test_clip_boxes_is_the_papers_np_clip_for_every_centre_and_cut():
    # the paper's rand_bbox: np.clip(c -+ cut // 2, 0, W), the right and bottom edges included
    import numpy as np

    from rmix.mixing import clip_boxes
    for w, h in ((5, 8), (8, 8), (13, 6)):
        for cut_w in range(0, w + 2):
            cut_h = (cut_w * h) // w
            for cx in range(w):
                for cy in range(h):
                    got = clip_boxes(torch.tensor([cx]), torch.tensor([cy]), torch.tensor([cut_w]),
                                     torch.tensor([cut_h]), h, w)[0].tolist()
                    want = [np.clip(cx - cut_w // 2, 0, w), np.clip(cy - cut_h // 2, 0, h),
                            np.clip(cx + cut_w // 2, 0, w), np.clip(cy + cut_h // 2, 0, h)]
                    assert got == [int(v) for v in want], (w, h, cut_w, cx, cy)


def test_recursive_mix_boxes_reach_every_edge_of_the_image():
    # centres uniform over [0, W) x [0, H): boxes touch the last column and row, as the paper's do
    from rmix.mixing import RecursiveMix
    policy = RecursiveMix(10, alpha=1.0, per_sample=True, mean=(0.0,) * 3, std=(1.0,) * 3,
                          generator=torch.Generator().manual_seed(0))
    boxes = torch.cat([policy.sample_boxes(64, 9, 7) for _ in range(50)])
    assert boxes[:, 0].min() == 0 and boxes[:, 1].min() == 0
    assert boxes[:, 2].max() == 7 and boxes[:, 3].max() == 9
    assert (boxes[:, 2] <= 7).all() and (boxes[:, 3] <= 9).all()


def test_recursive_mix_centres_are_uniform_over_every_column_and_row():
    # with a vanishing alpha the box is empty at its centre (cut 0): its corner is the centre drawn,
    # which must take every value of [0, W) and [0, H), the paper's np.random.randint(W)
    from rmix.mixing import RecursiveMix
    policy = RecursiveMix(10, alpha=1e-9, per_sample=True, mean=(0.0,) * 3, std=(1.0,) * 3,
                          generator=torch.Generator().manual_seed(0))
    boxes = torch.cat([policy.sample_boxes(64, 9, 7) for _ in range(20)])
    assert torch.equal(boxes[:, 0], boxes[:, 2]) and torch.equal(boxes[:, 1], boxes[:, 3])
    assert set(boxes[:, 0].tolist()) == set(range(7)) and set(boxes[:, 1].tolist()) == set(range(9))


def test_cutmix_takes_one_box_for_the_batch_and_refuses_boxes_that_differ():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8, generator=g)
    cut = CutMix(5, mean=(0.0,) * 3, std=(1.0,) * 3, generator=torch.Generator().manual_seed(1))
    same = cut(images, torch.arange(4), boxes=torch.tensor([[1, 2, 5, 6]] * 4))
    one = CutMix(5, mean=(0.0,) * 3, std=(1.0,) * 3, generator=torch.Generator().manual_seed(1))(
        images, torch.arange(4), boxes=torch.tensor([1, 2, 5, 6]))
    assert torch.equal(same.images, one.images) and torch.allclose(same.lam, torch.full((4,), 1 - 16 / 64))
    with pytest.raises(ValueError, match="CutMix pastes one box into the whole batch, got 4 boxes that differ"):
        cut(images, torch.arange(4), boxes=torch.tensor([[1, 2, 5, 6], [0, 0, 8, 8], [1, 2, 5, 6], [1, 2, 5, 6]]))
    with pytest.raises(ValueError, match="got 2 boxes for 4 images"):
        cut(images, torch.arange(4), boxes=torch.tensor([[1, 2, 5, 6]] * 2))


@pytest.mark.parametrize("policy", [NoMix, Mixup, CutMix, RecursiveMix])
def test_an_empty_batch_mixes_to_an_empty_batch(policy):
    p = policy(5, mean=(0.0,) * 3, std=(1.0,) * 3, generator=torch.Generator().manual_seed(0))
    out = p(torch.empty(0, 8, 8, 3, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    assert out.images.shape == (0, 3, 8, 8) and out.soft_targets.shape == (0, 5) and out.lam.shape == (0,)


# --- what the mutation run found untested (docs/DEVELOPMENT.md#mutation-testing) ---

MS = dict(mean=(0.0,) * 3, std=(1.0,) * 3)


def test_smoothing_with_two_classes_and_none_with_one():
    from rmix.mixing import smooth
    got = smooth(torch.tensor([0, 1]), 2, 0.2)
    torch.testing.assert_close(got, torch.tensor([[0.8, 0.2], [0.2, 0.8]]))
    torch.testing.assert_close(smooth(torch.tensor([0, 0]), 1, 0.2), torch.ones(2, 1))  # one class: nothing to spread
    torch.testing.assert_close(smooth(torch.tensor([0, 1]), 2, 0.0), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("targets,message", [
    (torch.tensor([True, False]), "targets"), (torch.tensor([0, 5]), "got 5"), (torch.tensor([-2, 1]), "got -2"),
    (torch.full((2, 6), 1 / 6), r"\(N, 5\)"), (torch.tensor([[0.5, 0.5, -0.5, 0.5, 0.0]] * 2), "must be >= 0"),
    (torch.tensor([[0.5, 0.5, 0.5, 0.0, 0.0]] * 2), "rows summing to 1")])
def test_targets_that_are_not_classes_or_probabilities_are_refused_naming_the_value(targets, message):
    with pytest.raises(ValueError, match=message):
        NoMix(5, **MS)(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), targets)


def test_one_hot_probabilities_with_zeros_are_targets():
    out = NoMix(3, **MS)(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    torch.testing.assert_close(out.soft_targets, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_sample_beta_draws_beta_alpha_alpha(alpha):
    # Kolmogorov-Smirnov against scipy's Beta(alpha, alpha): the Gamma sampler, its boost below 1, its ratio
    from scipy import stats
    g = torch.Generator().manual_seed(0)
    draws = [sample_beta(alpha, g) for _ in range(3000)]
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_sample_beta_with_a_vanishing_alpha_stays_in_the_unit_interval_at_its_ends():
    g = torch.Generator().manual_seed(0)
    draws = [sample_beta(1e-3, g) for _ in range(400)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert sum(d < 0.01 or d > 0.99 for d in draws) > 0.9 * len(draws)  # Beta(0.001, 0.001): almost all at 0 or 1


def test_policies_refuse_settings_out_of_range_and_take_the_edges():
    for bad in (dict(alpha=0.0), dict(alpha=-1.0), dict(smoothing=1.0), dict(smoothing=-0.1)):
        with pytest.raises(ValueError):
            Mixup(5, **bad, **MS)
    with pytest.raises(ValueError, match="num_classes"):
        NoMix(0, **MS)
    NoMix(1, **MS)  # one class: allowed by the policy (the trainer refuses fewer than 2)
    Mixup(5, alpha=1e-3, smoothing=0.0, **MS)
    for bad in (dict(alpha=0.0), dict(alpha=1.5), dict(omega=-1.0)):
        with pytest.raises(ValueError):
            RecursiveMix(5, **bad, **MS)
    assert RecursiveMix(5, omega=0.0, **MS).omega == 0.0 and RecursiveMix(5, alpha=1.0, **MS).alpha == 1.0


def test_the_documented_defaults():
    # the paper's: alpha 0.5, omega 0.5, nearest, one box per batch; outputs NCHW unless asked for channels_last
    p = build_policy("recursive_mix", 5, alpha=0.5, **MS)
    assert (p.alpha, p.omega, p.interpolate, p.per_sample) == (0.5, 0.5, "nearest", False)
    r = RecursiveMix(5, **MS)
    assert (r.alpha, r.omega) == (0.5, 0.5)
    out = NoMix(5, **MS)(torch.zeros(2, 4, 6, 3, dtype=torch.uint8), torch.tensor([0, 1]))
    assert out.images.is_contiguous() and out.boxes.shape == (2, 4) and not out.boxes.any()
    last = NoMix(5, channels_last=True, **MS)(torch.zeros(2, 4, 6, 3, dtype=torch.uint8), torch.tensor([0, 1]))
    assert last.images.is_contiguous(memory_format=torch.channels_last) and not last.images.is_contiguous()


def test_policies_without_a_generator_draw_the_same_each_time():
    a, b = CutMix(5, alpha=1.0, **MS), CutMix(5, alpha=1.0, **MS)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(images, torch.arange(4)).boxes, b(images, torch.arange(4)).boxes)


def test_cutmix_box_side_is_the_square_root_of_one_minus_lam(monkeypatch):
    # the paper's CutMix: lam ~ Beta, side = sqrt(1 - lam) of the image side; lam from the clipped box
    import rmix.mixing as M
    monkeypatch.setattr(M, "sample_beta", lambda alpha, g=None: 0.75)  # side 0.5
    cut = CutMix(5, alpha=1.0, generator=torch.Generator().manual_seed(0), **MS)
    images = torch.zeros(2, 64, 32, 3, dtype=torch.uint8)
    widths, heights = set(), set()
    for _ in range(60):
        out = cut(images, torch.arange(2))
        x1, y1, x2, y2 = out.boxes[0].tolist()
        widths.add(x2 - x1)
        heights.add(y2 - y1)
        torch.testing.assert_close(out.lam, torch.full((2,), 1 - (x2 - x1) * (y2 - y1) / (64 * 32)))
    assert max(widths) == 16 and max(heights) == 32  # unclipped: half of each side


def test_cutmix_with_an_empty_box_keeps_every_image():
    cut = CutMix(5, alpha=1.0, **MS)
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for box in ([3, 0, 3, 8], [0, 5, 8, 5]):  # no width, or no height
        out = cut(images, torch.arange(3), boxes=torch.tensor(box))
        assert torch.equal(out.lam, torch.ones(3))
        torch.testing.assert_close(out.images, images.permute(0, 3, 1, 2).float())


def test_recursive_mix_state_round_trips_and_the_next_call_mixes():
    g = torch.Generator().manual_seed(0)
    a = RecursiveMix(5, generator=torch.Generator().manual_seed(1), **MS)
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=g)
    out = a(images, torch.arange(3))
    a.remember(out.images, out.soft_targets, torch.randn(3, 5, generator=g))
    saved = {k: None if v is None else v.clone() for k, v in a.state_dict().items()}
    b = RecursiveMix(5, generator=torch.Generator().manual_seed(1), **MS)
    b.load_state_dict({k: None if v is None else v.clone() for k, v in saved.items()})
    assert set(b.state_dict()) == set(saved) and all(v is not None for v in saved.values())
    assert all(torch.equal(b.state_dict()[k], saved[k]) for k in saved)
    b.load_state_dict(a.state_dict(), device=torch.device("cpu"))
    nxt = b(images, torch.arange(3))  # restored: the next call mixes, no "called twice"
    assert (nxt.lam < 1).any() or nxt.boxes.any()
    with pytest.raises(RuntimeError, match="called twice without remember"):
        b(images, torch.arange(3))  # a second call with history, before remember
    fresh = RecursiveMix(5, **MS)
    fresh.load_state_dict({"history": None, "history_targets": None, "history_logits": None})
    assert torch.equal(fresh(images, torch.arange(3)).lam, torch.ones(3))


def test_a_history_smaller_than_the_batch_is_refused_naming_both():
    p = RecursiveMix(5, **MS)
    small = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    out = p(small, torch.arange(2))
    p.remember(out.images, out.soft_targets, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="history: holds 2 images, the batch has 3"):
        p(torch.zeros(3, 8, 8, 3, dtype=torch.uint8), torch.arange(3))


def test_roi_boxes_are_the_pasted_box_or_the_whole_image():
    from rmix.mixing import MixOut
    boxes = torch.tensor([[1, 2, 5, 6], [0, 0, 0, 0], [3, 1, 3, 7], [2, 4, 6, 4], [0, 0, 10, 8]])
    out = MixOut(torch.zeros(5, 3, 8, 10), torch.zeros(5, 2), boxes, torch.ones(5))
    got = roi_boxes(out, 8, 10)
    assert got.tolist() == [[1, 2, 5, 6], [0, 0, 10, 8], [0, 0, 10, 8], [0, 0, 10, 8], [0, 0, 10, 8]]


# What the mutation run's second pass left alive in rmix/mixing.py (docs/DEVELOPMENT.md#mutation-testing)

@pytest.mark.parametrize("shape", [0.3, 1.0, 3.0])
def test_the_gamma_sampler_draws_gamma_and_its_log(shape):
    # the Gamma draws themselves, not only their ratio: a common scale cancels in a / (a + b)
    from scipy import stats

    from rmix.mixing import _sample_gamma
    g = torch.Generator().manual_seed(1)
    pairs = [_sample_gamma(shape, g) for _ in range(20_000)]
    draws = np.array([p[0] for p in pairs])
    assert stats.kstest(draws, stats.gamma(shape).cdf).pvalue > 1e-3
    assert abs(draws.mean() - shape) < 4 * math.sqrt(shape / len(draws))  # mean shape, variance shape
    for value, log in pairs[:200]:
        if value > 0:
            assert log == pytest.approx(math.log(value), rel=1e-9, abs=1e-9)


def test_sample_beta_where_both_gamma_draws_underflow_is_the_ratio_of_their_logs(monkeypatch):
    # a / (a + b) = 1 / (1 + exp(log b - log a)), by hand, where a and b are both 0.0 in floats
    import rmix.mixing as M
    for log_a, log_b, want in ((-800.0, -900.0, 1.0 / (1.0 + math.exp(-100.0))),
                               (-900.0, -800.0, 1.0 / (1.0 + math.exp(100.0))),
                               (-850.0, -850.0, 0.5), (-1000.0, -100.0, 0.0)):
        draws = iter([(0.0, log_a), (0.0, log_b)])
        monkeypatch.setattr(M, "_sample_gamma", lambda shape, g, draws=draws: next(draws))
        assert M.sample_beta(1e-3) == pytest.approx(want, rel=1e-12, abs=1e-300), (log_a, log_b)


def test_the_index_draws_cover_exactly_zero_to_high():
    from rmix.mixing import _randint
    d = _randint(5, 5000, torch.Generator().manual_seed(0))
    assert int(d.min()) == 0 and int(d.max()) == 4


def test_recursive_mix_refuses_a_zero_or_negative_area():
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            RecursiveMix(K, alpha=bad, **MS)


def test_mixup_and_cutmix_default_to_alpha_one_as_the_papers_and_timm():
    assert Mixup(K, **MS).alpha == 1.0 and CutMix(K, **MS).alpha == 1.0


def test_cutmix_on_an_empty_batch_gives_no_boxes():
    out = CutMix(K, **MS)(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    assert out.boxes.shape == (0, 4) and out.lam.shape == (0,)


def test_a_label_out_of_range_names_the_range():
    with pytest.raises(ValueError, match=re.escape(f"must be in [0, {K}), got {K}")):
        CutMix(K, **MS)(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, K]))
    with pytest.raises(ValueError, match=re.escape(f"must be in [0, {K}), got -1")):  # the bad one, not the max
        CutMix(K, **MS)(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.tensor([-1, 2]))
    from rmix.mixing import check_targets
    with pytest.raises(ValueError):
        check_targets(torch.full((2, K + 1), 1.0 / (K + 1)), K)  # probabilities for another K


def test_recursive_mix_state_moves_to_the_device_it_is_loaded_on():
    rm = RecursiveMix(K, **MS)
    images, labels = batch(4, 8, 8, 0)
    out = rm(images, labels)
    rm.remember(out.images, out.soft_targets, torch.randn(4, K))
    other = RecursiveMix(K, **MS)
    other.load_state_dict(rm.state_dict(), device="meta")
    assert other.history.device.type == "meta" and other.history_logits.device.type == "meta"
    other.load_state_dict(rm.state_dict())  # no device: kept where they are
    assert other.history.device.type == "cpu"


def test_recursive_mix_keeps_a_bounded_number_of_output_buffers():
    # each new batch shape gets a buffer; old ones are let go (the last batch of an epoch, eval sizes)
    rm = RecursiveMix(K, **MS)
    for n in range(12, 2, -1):  # a batch no larger than the history: no reset needed
        images, labels = batch(n, 8, 8, n)
        out = rm(images, labels)
        rm.remember(out.images, out.soft_targets, torch.randn(n, K))
        assert len(rm._buffers) <= 2  # the history's and the output's


@pytest.mark.parametrize("make", [lambda: CutMix(K, float("inf"), **MS), lambda: Mixup(K, float("nan"), **MS),
                                  lambda: RecursiveMix(K, omega=float("nan"), **MS)])
def test_non_finite_settings_are_refused(make):
    # alpha = inf made the Beta sampler loop for ever
    with pytest.raises(ValueError, match="alpha|omega"):
        make()


def test_a_fractional_class_count_is_refused():
    with pytest.raises(ValueError, match="num_classes"):
        Mixup(2.5, 1.0, **MS)


def test_remember_refuses_logits_of_another_width_and_a_layout_mixup_is_named():
    rm = RecursiveMix(K, **MS)
    images, labels = batch(4, 8, 8, 0)
    out = rm(images, labels)
    with pytest.raises(ValueError, match=re.escape(f"logits: expected (4, {K})")):
        rm.remember(out.images, out.soft_targets, torch.randn(4, K + 2))
    with pytest.raises(ValueError, match="uint8 batches are"):  # NCHW bytes: 16 "channels"
        RecursiveMix(K, **MS)(images.permute(0, 3, 1, 2).contiguous(), labels)


# --- bad inputs the probe found accepted (silent wrong results) or answered with a raw error ---

@pytest.mark.parametrize("policy", [CutMix, RecursiveMix])
def test_boxes_outside_the_image_are_refused_by_every_policy_that_takes_boxes(policy):
    # CutMix took them: lam -2.52 and soft targets down to -2.52
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    p = policy(10, 1.0)
    with pytest.raises(ValueError, match=re.escape("boxes[0]: [10, 10, 40, 40] lies outside the 16x16 image")):
        p(images, targets, boxes=torch.tensor([[10, 10, 40, 40]] * 4))
    for box in ([-1, 0, 4, 4], [0, -1, 4, 4], [0, 0, 17, 4], [0, 0, 4, 17]):
        with pytest.raises(ValueError, match=r"^boxes\[0\]: .* lies outside the 16x16 image"):
            p(images, targets, boxes=torch.tensor([box] * 4))
    with pytest.raises(ValueError, match="^boxes: expected integer pixel coordinates"):
        p(images, targets, boxes=torch.tensor([[1.5, 0.0, 4.0, 4.0]] * 4))
    out = p(images, targets, boxes=torch.tensor([[0, 0, 16, 16]] * 4))  # the whole image: the edge is inside
    if policy is RecursiveMix:  # the first call pastes nothing; the second pastes the history
        p.remember(out.images, out.soft_targets, None)
        with pytest.raises(ValueError, match=r"^boxes\[0\]: \[8, 8, 24, 24\] lies outside"):
            p(images, targets, boxes=torch.tensor([[8, 8, 24, 24]] * 4))
        out = p(images, targets, boxes=torch.tensor([[0, 0, 16, 16]] * 4))
    assert out.lam.min() >= 0 and out.soft_targets.min() >= 0


@pytest.mark.parametrize("lam,message", [
    (1.5, "got 1.5"), (-0.5, "got -0.5"), (float("nan"), "got nan"), (torch.tensor(1.5), "got 1.5"),
    (torch.rand(4), re.escape("got a tensor of shape (4,)")), ("0.5", "got str"), (True, "got bool")])
def test_mixup_refuses_a_lam_that_is_not_one_number_in_the_unit_interval(lam, message):
    # 1.5 and -0.5 gave soft targets down to -0.5, NaN gave NaN, and a tensor of 4 torch's own error
    with pytest.raises(ValueError, match=f"^lam: expected one number in \\[0, 1\\].*{message}"):
        Mixup(10, 1.0, **MS)(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), lam=lam)


def test_mixup_takes_one_lam_for_the_batch_at_the_edges_and_as_a_one_element_tensor():
    images, targets = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    for lam in (0, 1, 0.25, torch.tensor(0.25), torch.tensor([0.25])):
        out = Mixup(10, 1.0, **MS)(images, targets, lam=lam)
        torch.testing.assert_close(out.lam, torch.full((4,), float(lam)))
        assert out.soft_targets.min() >= 0 and torch.allclose(out.soft_targets.sum(1), torch.ones(4))


@pytest.mark.parametrize("name,setting,value", [("cutmix", "omega", 3.0), ("mixup", "interpolate", "bilinear"),
                                                ("none", "per_sample", True), ("cutmix", "omega", float("nan"))])
def test_build_policy_refuses_recursive_mix_settings_given_to_another_policy(name, setting, value):
    # as config.ONLY_FOR refuses --aug-omega, --interpolate, --per-sample-boxes with another --aug
    with pytest.raises(ValueError, match=f"^{setting}: only recursive_mix uses it, got .* for {name}"):
        build_policy(name, 10, alpha=1.0, **{setting: value}, **MS)


def test_build_policy_takes_recursive_mix_settings_at_their_defaults_for_any_policy():
    for name, cls in (("none", NoMix), ("mixup", Mixup), ("cutmix", CutMix)):
        assert type(build_policy(name, 10, alpha=1.0, omega=0.5, interpolate="nearest", per_sample=False, **MS)) is cls
    rm = build_policy("recursive_mix", 10, alpha=0.5, omega=3.0, interpolate="bilinear", per_sample=True, **MS)
    assert (rm.omega, rm.interpolate, rm.per_sample) == (3.0, "bilinear", True)


def test_recursive_mix_load_state_dict_names_the_missing_and_unexpected_keys():
    # was KeyError: 'history'
    rm = RecursiveMix(K, **MS)
    with pytest.raises(ValueError, match=re.escape("missing ['history', 'history_targets', 'history_logits'], "
                                                   "unexpected ['foo']")):
        rm.load_state_dict({"foo": 1})
    with pytest.raises(ValueError, match=r"^state: .*missing \['history_logits'\], unexpected \[\]"):
        rm.load_state_dict({"history": None, "history_targets": None})
    with pytest.raises(ValueError, match="^state: expected a dict"):
        rm.load_state_dict([None, None, None])
    assert rm.history is None  # a refused state leaves the policy as it was


def test_the_module_docstring_example_runs():
    """rmix.mixing's opening example, as written, on a real model (it once called roi_boxes(out))."""
    import rmix.mixing
    from rmix.losses import mix_loss
    from rmix.mixing import RecursiveMix, roi_boxes
    from rmix.models import build
    lines = rmix.mixing.__doc__.split("\n\n")[1].splitlines()
    code = [line[4:] for line in lines if line.strip() != "..."]
    make, step = code[0], "\n".join(code[1:])  # the policy once, then two steps
    model = build("resnet8", 10)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8, generator=g)
    env = dict(RecursiveMix=RecursiveMix, roi_boxes=roi_boxes, mix_loss=mix_loss, model=model, omega=0.5,
               MEAN=(120.0, 120.0, 120.0), STD=(60.0, 60.0, 60.0), images=images, targets=torch.arange(4))
    exec(make, env)
    exec(step, env)
    assert env["policy"].prev_logits is None  # nothing to paste yet
    exec(step, env)  # the second step pastes the first's batch
    assert env["roi_logits"].shape == (4, 10) and torch.isfinite(env["loss"])
    assert env["policy"].prev_logits is not None
