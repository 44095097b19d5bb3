"""RecursiveMix as timm's mixup_fn: a timm model and timm's loss train several steps with it; the paste
and the labels are checked against rmix's own policy (same generator, same boxes) and by hand."""
import pytest
import torch
import torch.nn.functional as F

from rmix.mixing import RecursiveMix, smooth
from rmix.timm_mix import RecursiveMixup

timm = pytest.importorskip("timm")
K, N, S = 5, 6, 32


def batches(steps, seed=0, uint8=False):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        t = torch.randint(0, K, (N,), generator=g)
        if uint8:
            yield torch.randint(0, 256, (N, S, S, 3), generator=g, dtype=torch.uint8), t
        else:
            yield torch.randn(N, 3, S, S, generator=g), t


def test_a_timm_loop_with_timms_loss_matches_rmixs_policy_and_the_paper():
    from timm.loss import SoftTargetCrossEntropy
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=K)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = SoftTargetCrossEntropy()
    fn = RecursiveMixup(num_classes=K, alpha=0.5, label_smoothing=0.1, generator=torch.Generator().manual_seed(7))
    ref = RecursiveMix(K, 0.5, smoothing=0.1, smoothing_form="uniform", generator=torch.Generator().manual_seed(7))
    prev_x = prev_y = None
    pasted = 0
    for x, t in batches(5):
        mixed, y = fn(x, t)
        out = ref(x, t)
        assert torch.equal(mixed, out.images) and torch.equal(y, out.soft_targets)  # same boxes, same paste
        x1, y1, x2, y2 = fn.out.boxes[0].tolist()
        lam = 1 - (x2 - x1) * (y2 - y1) / (S * S)
        want_y = smooth(t, K, 0.1, "uniform")  # timm's smoothing: 1 - s + s/K, s/K
        want_x = x.clone()
        if prev_x is not None and x2 > x1 and y2 > y1:  # the previous mixed batch, resized into the box
            want_x[:, :, y1:y2, x1:x2] = F.interpolate(prev_x, size=(y2 - y1, x2 - x1), mode="nearest")
            want_y = lam * want_y + (1 - lam) * prev_y
            pasted += 1
        torch.testing.assert_close(mixed, want_x)
        torch.testing.assert_close(y, want_y)
        torch.testing.assert_close(fn.out.lam, torch.full((N,), lam))
        loss = criterion(model(mixed), y)  # timm's loop, unchanged
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.remember(out.images, out.soft_targets, None)
        prev_x, prev_y = mixed.clone(), y.clone()
    assert pasted >= 3 and torch.isfinite(loss)


def test_uint8_nhwc_batches_are_normalized_as_rmixs_loaders_give_them():
    mean, std = (120.0, 110.0, 100.0), (60.0, 50.0, 40.0)
    fn = RecursiveMixup(num_classes=K, mean=mean, std=std, label_smoothing=0.0)
    ref = RecursiveMix(K, 0.5, smoothing=0.0, smoothing_form="uniform", mean=mean, std=std)
    for x, t in batches(3, uint8=True):
        mixed, y = fn(x, t)
        out = ref(x, t)
        assert torch.equal(mixed, out.images) and torch.equal(y, out.soft_targets)
        ref.remember(out.images, out.soft_targets, None)
    first = next(batches(1, uint8=True))[0]
    fresh = RecursiveMixup(num_classes=K, mean=mean, std=std)(first, torch.zeros(N, dtype=torch.long))[0]
    want = (first.permute(0, 3, 1, 2).float() - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(fresh, want)  # the first call pastes nothing


def test_the_consistency_term_uses_the_observed_logits_of_the_pasted_batch():
    from rmix.models import build
    model = build("timm/test_resnet", K).eval()
    fn = RecursiveMixup(num_classes=K, omega=0.5)
    logits_before = None
    for step, (x, t) in enumerate(batches(3)):
        mixed, y = fn(x, t)
        logits, roi_logits = model(mixed, fn.box)
        c = fn.consistency(roi_logits)
        if step == 0:
            assert c.item() == 0 and torch.equal(fn.box[0], torch.tensor([0, 0, S, S]))
        else:
            target = F.softmax(logits_before, -1)
            ce = -(target * F.log_softmax(roi_logits, -1)).sum(-1)
            torch.testing.assert_close(c, 0.5 * ((1 - fn.out.lam) * ce).mean())
        fn.observe(logits)
        logits_before = logits.detach()


def test_mixup_enabled_off_reset_and_a_growing_batch():
    fn = RecursiveMixup(num_classes=K, label_smoothing=0.1)
    xs = list(batches(3))
    fn(*xs[0])
    fn.mixup_enabled = False  # timm's --mixup-off-epoch
    x, y = fn(*xs[1])
    assert torch.equal(x, xs[1][0]) and torch.allclose(y, smooth(xs[1][1], K, 0.1, "uniform"))
    fn.mixup_enabled = True
    fn(xs[2][0][:3], xs[2][1][:3])  # a short last batch, then a full one: the history is dropped, no error
    x, _ = fn(*xs[0])
    assert torch.equal(x, xs[0][0])
    fn.reset()
    assert fn.policy.history is None


def test_it_refuses_to_run_in_a_dataloader_worker():
    fn = RecursiveMixup(num_classes=K)
    data = [(torch.randn(3, S, S), 0) for _ in range(4)]

    def collate(items):
        x = torch.stack([a for a, _ in items])
        return fn(x, torch.tensor([b for _, b in items]))
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, collate_fn=collate)
    with pytest.raises(RuntimeError, match="not in a DataLoader worker"):
        next(iter(loader))
