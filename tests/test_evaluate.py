"""Evaluation against a hand computation on a tiny model: eval mode (BatchNorm's running statistics used,
never updated), top-1 and top-5 counted per image, the loss a mean over images, not over batches."""
import pytest
import torch
import torch.nn.functional as F

from rmix import engine
from rmix.mixing import Normalize

MEAN, STD = (100.0, 110.0, 120.0), (50.0, 55.0, 60.0)


class Tiny(torch.nn.Module):
    """conv -> BatchNorm -> pool -> linear: its output in train mode differs from eval mode."""

    def __init__(self, k):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, k)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


def tiny_model(k=7):
    torch.manual_seed(0)
    model = Tiny(k)
    with torch.no_grad():  # running statistics far from any batch's own: train mode would show
        model.bn.running_mean.uniform_(-2, 2)
        model.bn.running_var.uniform_(0.5, 4)
    return model


def batches(sizes, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, 12, 12, 3), dtype=torch.uint8, generator=g),
             torch.randint(0, k, (n,), generator=g)) for n in sizes]


def by_hand(model, loader, k=7):
    """top-1, top-5 (percent) and mean cross-entropy over every image, one image at a time, eval mode."""
    model.eval()
    top1 = top5 = loss = n = 0
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        for images, targets in loader:
            for image, t in zip(images, targets):
                logits = model(((image.permute(2, 0, 1).float() - mean) / std)[None])[0]
                order = logits.argsort(descending=True).tolist()
                top1 += order[0] == t.item()
                top5 += t.item() in order[:5]
                loss += F.cross_entropy(logits[None], t[None]).item()
                n += 1
    return 100 * top1 / n, 100 * top5 / n, loss / n


def test_evaluate_is_the_hand_computation_over_images_in_batches_of_any_size():
    model, loader = tiny_model(), batches([5, 3, 1])  # unequal batches: a per-batch mean would differ
    want = by_hand(model, loader)
    model.train()  # as the training loop leaves it
    got = engine.evaluate(model, loader, Normalize(MEAN, STD), None)
    assert got["images"] == 9
    assert got["top1"] == pytest.approx(want[0]) and got["top5"] == pytest.approx(want[1])
    assert got["loss"] == pytest.approx(want[2], rel=1e-5)
    assert 0 < got["top1"] < 100 and got["top1"] < got["top5"]  # a case where the figures say something


def test_evaluate_runs_in_eval_mode_and_leaves_batchnorm_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    engine.evaluate(model, batches([4, 4]), Normalize(MEAN, STD), None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.slow
def test_the_logged_val_loss_is_the_mean_over_images(jpeg_folder_4x6, tmp_path):
    # end to end: metrics.jsonl's val_loss and val_top1 are the hand computation's on the saved weights
    import json

    from rmix import checkpoint
    from rmix.config import TrainConfig, replace
    from rmix.data import make_loader, resolve_data
    from rmix.models import build
    cfg = replace(TrainConfig(), model="resnet8", epochs=1, batch_size=8, device="cpu", out=str(tmp_path / "run"),
                  **{"data.data_dir": str(jpeg_folder_4x6), "data.crop_size": 16, "data.val_resize": 20,
                     "data.loader": "torch", "data.workers": 0})
    engine.train(cfg)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    saved = checkpoint.read(tmp_path / "run" / "latest.pt")
    model = build("resnet8", 4)
    model.load_state_dict(saved["model"])
    root, dataset = resolve_data(str(jpeg_folder_4x6), "auto")
    val = make_loader(replace(cfg, batch_size=5), root, dataset, torch.device("cpu"), train=False)  # 12 = 5 + 5 + 2
    mean, std = torch.tensor(saved["config"]["data"]["mean"]).view(3, 1, 1), torch.tensor(
        saved["config"]["data"]["std"]).view(3, 1, 1)
    model.eval()
    losses, hits = [], []
    with torch.no_grad():
        for images, targets in val:
            for image, t in zip(images, targets):
                logits = model(((image.permute(2, 0, 1).float() - mean) / std)[None])
                losses.append(F.cross_entropy(logits, t[None]).item())
                hits.append(logits.argmax().item() == t.item())
    assert len(losses) == 12
    assert row["val_loss"] == pytest.approx(sum(losses) / 12, rel=1e-4)
    assert row["val_top1"] == pytest.approx(100 * sum(hits) / 12)


def test_evaluate_skips_an_empty_batch_and_counts_a_single_image_or_none():
    model = tiny_model()
    loader = batches([3, 0, 2])  # a rank's share of the val set can end one batch early
    want = by_hand(model, [b for b in loader if len(b[1])])
    got = engine.evaluate(model, loader, Normalize(MEAN, STD), None)
    assert got["images"] == 5 and got["loss"] == pytest.approx(want[2], rel=1e-5) and got["top1"] == pytest.approx(want[0])
    single = batches([1], seed=5)
    one = engine.evaluate(model, single, Normalize(MEAN, STD), None)
    assert one["images"] == 1 and one["top1"] == by_hand(model, single)[0] and one["top1"] in (0.0, 100.0)
    none = engine.evaluate(model, [], Normalize(MEAN, STD), None)
    assert none["images"] == 0 and none["top1"] == 0.0


class Counted(list):
    """Batches that say how many classes their loader has, as rmix's loaders do."""

    def __init__(self, items, num_classes):
        super().__init__(items)
        self.num_classes = num_classes


@pytest.mark.parametrize("k,top5", [(5, False), (6, True)])
def test_top5_is_reported_only_with_more_than_five_classes(k, top5):
    # with five classes or fewer every image is in its top five: 100 % says nothing, so it is None
    got = engine.evaluate(tiny_model(k), Counted(batches([4], k=k), k), Normalize(MEAN, STD), None)
    assert (got["top5"] is not None) == top5
