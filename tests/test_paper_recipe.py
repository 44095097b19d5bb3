"""The paper's recipe to the letter (RM code: utils.py, dataset.py, main.py, and its released logs)."""
import itertools
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data.distributed import DistributedSampler

from helpers import Cut, assert_same_run, cli_train, loader_of, read_ids, small_loader, write_coded_cifar
from rmix import config as C
from rmix.cli import cli
from rmix.mixing import RecursiveMix, smooth
from rmix.pipelines import read_arrays, shard_indices, train_batches
from rmix.pipelines.colour import PaperColour, colour_reference
from rmix.presets import preset
from rmix.schedule import lr_at

# ---- the learning rate of every epoch ----

# The first iteration of each epoch in log_imagenet_300epoch_r50_rm_79.20_top1_acc.log (lr printed to 6 places).
IMAGENET_LOG = {1: 0.033333, 5: 0.166667, 6: 0.199863, 7: 0.199803, 100: 0.150904, 150: 0.101047,
                299: 0.000022, 300: 0.000005}


def paper_adjust_learning_rate(epoch, lr, epochs, scheduler, warmup, milestones, gamma):
    """utils.adjust_learning_rate of the RM code, restated."""
    if epoch <= warmup:
        return lr * (epoch / (warmup + 1))
    if scheduler == "step":
        return lr * gamma ** sum(epoch > m for m in milestones)
    return lr * 0.5 * (1 + np.cos((epoch - 1) * np.pi / epochs))


def preset_lrs(name):
    cfg = preset(name)
    o = cfg.optim
    return cfg, [lr_at(e, o.lr, cfg.epochs, schedule=o.schedule, warmup=o.warmup, milestones=o.milestones,
                       gamma=o.gamma) for e in range(1, cfg.epochs + 1)]


@pytest.mark.parametrize("name", ["imagenet-r50-rm", "imagenet-r50-baseline", "imagenet-r50-mixup",
                                  "imagenet-r50-cutmix", "cifar10-pyramidnet200-rm", "cifar100-pyramidnet200-rm"])
def test_every_epoch_of_the_paper_presets_has_the_papers_lr(name):
    cfg, lrs = preset_lrs(name)
    o = cfg.optim
    want = [paper_adjust_learning_rate(e, o.lr, cfg.epochs, o.schedule, o.warmup, o.milestones, o.gamma)
            for e in range(1, cfg.epochs + 1)]
    assert len(lrs) == 300
    assert lrs == pytest.approx(want, rel=1e-12, abs=0)


def test_imagenet_lr_equals_the_released_log():
    _, lrs = preset_lrs("imagenet-r50-rm")
    for epoch_, logged in IMAGENET_LOG.items():
        assert round(lrs[epoch_ - 1], 6) == logged, epoch_


def test_cifar_lr_equals_the_released_logs():
    _, lrs = preset_lrs("cifar10-pyramidnet200-rm")
    assert round(lrs[0], 6) == 0.041667 and lrs[5:150] == [0.25] * 145
    assert lrs[150:225] == pytest.approx([0.025] * 75) and lrs[225:] == pytest.approx([0.0025] * 75)


# ---- the last partial batch: DistributedSampler(drop_last=False) + DataLoader(drop_last=False) ----

@pytest.mark.parametrize("n,world", [(17, 1), (17, 2), (17, 3), (17, 8), (16, 8), (9, 8), (100, 7)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_train_shards_are_distributed_samplers(n, world, drop_last):
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=5,
                                     drop_last=drop_last)
        sampler.set_epoch(3)
        assert shard_indices(n, train=True, seed=5, epoch=3, rank=rank, world_size=world,
                             drop_last=drop_last) == list(sampler)


@pytest.mark.parametrize("n,world,batch,keep,drop", [
    (1_281_167, 8, 64, 2503, 2502),   # ImageNet at global 512: the paper's log shows 2503 iterations
    (50_000, 2, 32, 782, 781),        # CIFAR-10 at 2 x 32: 782 in the paper's logs
    (50_000, 1, 64, 782, 781),
    (1_281_167, 1, 512, 2503, 2502),
    (17, 8, 2, 2, 1),
])
def test_steps_per_epoch(n, world, batch, keep, drop):
    assert train_batches(n, batch, world, drop_last=False) == keep
    assert train_batches(n, batch, world, drop_last=True) == drop


@pytest.mark.parametrize("world", [1, 2, 8])
def test_kept_last_batch_gives_every_rank_the_same_steps_and_every_sample(world):
    n, batch = 103, 4
    shards = [shard_indices(n, train=True, seed=1, epoch=0, rank=r, world_size=world, drop_last=False)
              for r in range(world)]
    assert {len(s) for s in shards} == {math.ceil(n / world)}
    assert set(itertools.chain(*shards)) == set(range(n))  # nothing left out; fewer than `world` repeats
    assert sum(map(len, shards)) - n < world
    steps = train_batches(n, batch, world, drop_last=False)
    assert steps == math.ceil(math.ceil(n / world) / batch)


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("world", [1, 2])
def test_loaders_keep_the_short_last_batch(kind, world, solid_folder_3x5):
    # 15 images, batch 4: one rank 4 + 4 + 4 + 3; two ranks pad to 8 each, 4 + 4
    from rmix.pipelines import scan_image_folder
    index = scan_image_folder(solid_folder_3x5)
    for rank in range(world):
        loader = small_loader(kind, solid_folder_3x5, train=True, batch_size=4, seed=6, rank=rank, world_size=world,
                              drop_last=False)
        assert len(loader) == train_batches(15, 4, world, drop_last=False) == (4 if world == 1 else 2)
        sizes = []
        for e in range(2):
            loader.set_epoch(e)
            got = []
            for images, labels in loader:
                sizes.append(len(labels))
                got += read_ids(images)
                assert images.shape[1:] == (16, 16, 3) and len(images) == len(labels)
            order = shard_indices(15, train=True, seed=6, epoch=e, rank=rank, world_size=world, drop_last=False)
            assert got == [(index.labels[i], int(index.files[i].split("img")[1][0])) for i in order]
        assert sizes == ([4, 4, 4, 3] if world == 1 else [4, 4]) * 2


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_cifar_loaders_keep_the_short_last_batch(kind, tmp_path):
    write_coded_cifar(tmp_path, False)  # 30 train images
    cifar = read_arrays(tmp_path, "cifar10", train=True)
    loader = loader_of(kind, cifar, train=True, batch_size=8, seed=1, drop_last=False,
                       workers=2 if kind == "dali" else 0)
    sizes = [len(labels) for _, labels in loader]
    assert loader.num_samples == 30 and len(loader) == 4 and sizes == [8, 8, 8, 6]
    with pytest.raises(ValueError, match="no full batch"):
        loader_of(kind, cifar, train=True, batch_size=64, drop_last=True)
    assert len(loader_of(kind, cifar, train=True, batch_size=64, drop_last=False)) == 1


def test_recursive_mix_pastes_the_history_into_the_short_batch():
    policy = RecursiveMix(10, alpha=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    full = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8)
    first = policy(full, torch.arange(8))
    policy.remember(first.images, first.soft_targets, torch.randn(8, 10))
    short = torch.zeros(3, 8, 8, 3, dtype=torch.uint8)
    out = policy(short, torch.zeros(3, dtype=torch.long), boxes=torch.tensor([[0, 0, 8, 8]] * 3))
    torch.testing.assert_close(out.images, first.images[:3])  # history[:bs], as the paper's old_x[:bs]
    torch.testing.assert_close(out.soft_targets, first.soft_targets[:3])


@pytest.mark.slow
def test_train_with_keep_last_runs_the_short_batch(jpeg_folder_4x6, tmp_path, monkeypatch):
    import rmix.engine as engine
    sizes = []
    real = engine.train_step

    def spy(model, policy, images, *args, **kwargs):
        sizes.append(images.shape[0])
        return real(model, policy, images, *args, **kwargs)

    monkeypatch.setattr(engine, "train_step", spy)
    common = ["train", "--data-dir", str(jpeg_folder_4x6), "--epochs", "1", "--batch-size", "10", "--crop-size", "16",
              "--val-resize", "20", "--model", "resnet8", "--workers", "1", "--loader", "torch"]
    r = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "keep"), "--keep-last"])
    assert r.exit_code == 0, r.output
    assert sizes == [10, 10, 4]  # 24 images
    sizes.clear()
    r = CliRunner().invoke(cli, common + ["--out", str(tmp_path / "drop")])
    assert r.exit_code == 0, r.output
    assert sizes == [10, 10]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_mid_epoch_resume_is_exact_with_the_last_batch_kept(jpeg_folder_4x6, tmp_path, monkeypatch, loader):
    from rmix import checkpoint
    keep = ["--keep-last", "--batch-size", "10", "--loader", loader, "--save-every-steps", "1"]
    assert cli_train(jpeg_folder_4x6, tmp_path / "ref", *keep).exit_code == 0
    real = checkpoint.save

    def save_then_cut(path, payload):  # epoch 2, after step 2 of 3: the short batch is still to come
        real(path, payload)
        if payload["epoch"] == 1 and payload["step"] == 2:
            raise Cut

    monkeypatch.setattr(checkpoint, "save", save_then_cut)
    r = cli_train(jpeg_folder_4x6, tmp_path / "cut", *keep)
    assert isinstance(r.exception, Cut), r.output
    monkeypatch.setattr(checkpoint, "save", real)
    r = cli_train(jpeg_folder_4x6, tmp_path / "cut", *keep, "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert_same_run(tmp_path / "cut", tmp_path / "ref")


def test_paper_presets_keep_the_last_batch():
    for name in ("imagenet-r50-rm", "imagenet-r50-cutmix", "cifar10-pyramidnet200-rm", "cifar100-pyramidnet200-rm"):
        assert preset(name).data.drop_last is False, name
    assert C.TrainConfig().data.drop_last is True  # rmix's own default is unchanged


# ---- label smoothing ----

@pytest.mark.parametrize("form,true,other", [("paper", 0.9, 0.1 / 9), ("uniform", 0.91, 0.01)])
def test_smoothing_values(form, true, other):
    soft = smooth(torch.tensor([3, 0]), 10, 0.1, form)
    want = torch.full((2, 10), other)
    want[0, 3] = want[1, 0] = true
    torch.testing.assert_close(soft, want)
    probs = torch.softmax(torch.randn(4, 10), -1)
    torch.testing.assert_close(smooth(probs, 10, 0.1, form).sum(-1), torch.ones(4))
    torch.testing.assert_close(smooth(torch.eye(10)[[3, 0]], 10, 0.1, form), want)  # one-hot rows alike


def test_smoothing_form_defaults_to_the_papers_and_is_validated():
    assert C.TrainConfig().mix.smoothing_form == "paper"
    with pytest.raises(ValueError, match="--smoothing-form"):
        C.validate(C.replace(C.TrainConfig(), **{"mix.smoothing_form": "timm"}))


# ---- normalization ----

PAPER_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
PAPER_CIFAR_STD = (0.2023, 0.1994, 0.2010)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_normalization_is_the_papers(dataset):
    for cfg in (preset(f"{dataset}-pyramidnet200-rm"), C.replace(C.TrainConfig(), **{"data.dataset": dataset})):
        cfg = C.with_dataset_stats(cfg, dataset)
        assert [m / 255 for m in cfg.data.mean] == pytest.approx(PAPER_CIFAR_MEAN, abs=1e-12)
        assert [s / 255 for s in cfg.data.std] == pytest.approx(PAPER_CIFAR_STD, abs=1e-12)


def test_folders_keep_imagenet_normalization_and_an_explicit_one_wins():
    cfg = C.with_dataset_stats(C.TrainConfig(), "folder")
    assert cfg.data.mean == C.IMAGENET_MEAN and cfg.data.std == C.IMAGENET_STD
    mine = C.replace(C.TrainConfig(), **{"data.mean": (1.0, 2.0, 3.0), "data.std": (4.0, 5.0, 6.0)})
    assert C.with_dataset_stats(mine, "cifar10").data.mean == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="data.mean"):
        C.validate(C.replace(C.TrainConfig(), **{"data.mean": (1.0, 2.0)}))


# ---- --aug-plus: the paper's jitter, whose random order is not observable ----

def _image(seed, h=9, w=7):
    return torch.randint(0, 256, (h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_the_papers_three_jitters_commute(seed):
    g = torch.Generator().manual_seed(seed)
    factors = 0.6 + 0.8 * torch.rand(3, generator=g)
    alpha = 0.1 * torch.randn(3, generator=g)
    image = _image(seed)
    outs = [colour_reference(image, factors, alpha, order, out_dtype=torch.float32)
            for order in itertools.permutations(range(3))]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-3)  # pixel units: far below one grey level


def _dali_colour(images, factors, alphas):
    from nvidia.dali import fn, pipeline_def

    from rmix.pipelines.dali import _colour_jitter_and_lighting

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        f = fn.external_source(source=lambda: factors, batch=True)
        a = fn.external_source(source=lambda: alphas, batch=True)
        return _colour_jitter_and_lighting(x, on_gpu=False, factors=f, alpha=a)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]) for i in range(len(images))]


def test_dali_colour_equals_the_reference_in_every_order():
    g = torch.Generator().manual_seed(0)
    images = [_image(s).numpy() for s in range(6)]
    factors = [(0.6 + 0.8 * torch.rand(3, generator=g)).numpy() for _ in images]
    alphas = [(0.1 * torch.randn(3, generator=g)).numpy() for _ in images]
    got = _dali_colour(images, factors, alphas)
    for k, order in enumerate(itertools.permutations(range(3))):
        want = colour_reference(torch.from_numpy(images[k]), factors[k], alphas[k], order)
        assert np.abs(got[k].astype(int) - want.numpy().astype(int)).max() <= 1, order  # rounding only


def test_torchvision_loader_colour_draws_like_the_paper():
    image = _image(1, 16, 16)
    torch.manual_seed(3)
    a = PaperColour()(image)
    torch.manual_seed(3)
    factors = 1 + (torch.rand(3) * 2 - 1) * 0.4
    alpha = torch.randn(3) * 0.1
    assert torch.equal(a, colour_reference(image, factors, alpha))
    assert not torch.equal(a, image)


# ---- one box stream for all ranks, as the paper's single seed ----

@pytest.mark.parametrize("shared", [False, True])
def test_shared_boxes_give_every_rank_the_same_draws(shared):
    from rmix.engine import make_policy
    cfg = C.replace(C.with_dataset_stats(C.TrainConfig(), "folder"), num_classes=10,
                    **{"mix.shared_boxes": shared})
    policies = [make_policy(cfg, torch.device("cpu"), None, rank) for rank in range(2)]
    draws = [[p.sample_boxes(4, 32, 32) for _ in range(5)] for p in policies]
    same = all(torch.equal(a, b) for a, b in zip(*draws))
    assert same == shared
