"""Weight EMA (--ema): timm's arithmetic, by hand and against timm's ModelEmaV3; trained, evaluated,
saved, resumed exactly mid-epoch, evaluated and exported from its checkpoint."""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers import Cut, assert_same_run, cut_after_save, train_args
from rmix import checkpoint
from rmix.cli import cli
from rmix.ema import ModelEma, ema_decay

timm = pytest.importorskip("timm")


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def steps(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(n):
        x = torch.randn(4, 3, 6, 6, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        yield


@pytest.mark.parametrize("warmup", [False, True])
def test_the_decay_is_timms(warmup):
    from timm.utils.model_ema import ModelEmaV3
    ref = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.998, use_warmup=warmup)
    assert [ema_decay(0.998, k, warmup) for k in range(1, 300)] == [ref.get_decay(k) for k in range(1, 300)]


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_by_hand_and_as_timm_over_a_few_steps(warmup):
    from timm.utils.model_ema import ModelEmaV3
    model = tiny_model()
    model(torch.zeros(1, 3, 6, 6))  # materialize the lazy layer
    ema = ModelEma(model, 0.9, warmup)
    ref = ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    hand = {k: v.clone() for k, v in model.state_dict().items()}
    for k, _ in enumerate(steps(model, 6), start=1):
        ema.update()
        ref.update(model, step=k)
        d = ema_decay(0.9, k, warmup)
        for name, v in model.state_dict().items():
            hand[name] = d * hand[name] + (1 - d) * v if v.is_floating_point() else v.clone()
    assert ema.updates == 6
    for name, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, hand[name], rtol=1e-6, atol=1e-7, msg=name)  # BN statistics too
        assert torch.equal(v, ref.module.state_dict()[name]), name
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


@pytest.fixture(scope="module")
def ema_run(jpeg_folder_4x6, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, "--ema", "0.5", "--ema-warmup"))
    assert r.exit_code == 0, r.output
    return out


def test_each_epoch_evaluates_the_ema_beside_the_model(ema_run):
    rows = [json.loads(x) for x in (ema_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_top1_ema"] is not None and r["val_loss_ema"] is not None for r in rows)
    best = checkpoint.read(ema_run / "best.pt")
    row = rows[best["epoch"] - 1]
    assert best["best_of"] == row["best_of"] == ("ema" if row["val_top1_ema"] > row["val_top1"] else "model")
    assert best["best_top1"] == max(max(r["val_top1"], r["val_top1_ema"]) for r in rows)
    assert best["ema"]["updates"] == 3 * best["epoch"]  # 3 steps an epoch, one update each
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(ema_run / "best.pt"), "--ema", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["top1"] == pytest.approx(row["val_top1_ema"])


def test_export_ema_loads_strictly(ema_run, tmp_path):
    from rmix.models import build
    r = CliRunner().invoke(cli, ["export", str(ema_run / "best.pt"), "--ema", "--out", str(tmp_path / "e.pth")])
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "e.pth", weights_only=True)
    ckpt = checkpoint.read(ema_run / "best.pt")
    assert all(torch.equal(state[k], ckpt["ema"]["model"][k]) for k in state)
    assert not all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    model = build("resnet8", 4)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("fc_roi.") for k in missing)  # the export drops the RoI head


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_cut_mid_epoch_resumes_the_ema_exactly(jpeg_folder_4x6, tmp_path, monkeypatch, loader):
    args = ("--loader", loader, "--ema", "0.7", "--save-every-steps", "1")
    ref = tmp_path / "ref"
    assert CliRunner().invoke(cli, train_args(jpeg_folder_4x6, ref, *args)).exit_code == 0
    real = cut_after_save(monkeypatch, 1, 2)
    out = tmp_path / "cut"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *args))
    assert isinstance(r.exception, Cut), r.output
    assert checkpoint.read(out / "latest.pt")["ema"]["updates"] == 5
    monkeypatch.setattr(checkpoint, "save", real)
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, *args, "--resume", "auto"))
    assert r.exit_code == 0, r.output
    assert_same_run(out, ref)
    want, got = checkpoint.read(ref / "latest.pt")["ema"], checkpoint.read(out / "latest.pt")["ema"]
    assert want["updates"] == got["updates"] == 9
    for k in want["model"]:
        torch.testing.assert_close(got["model"][k], want["model"][k], rtol=0, atol=0, msg=k)
    rows = lambda d: [json.loads(x)["val_top1_ema"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(out) == rows(ref)


@pytest.mark.parametrize("args,needle", [(["--ema", "1.5"], "--ema: must be in [0, 1)"),
                                         (["--ema-warmup"], "--ema-warmup: needs --ema DECAY")])
def test_bad_ema_options_are_one_line(jpeg_folder_4x6, tmp_path, args, needle):
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, tmp_path / "x", *args))
    assert r.exit_code == 2 and needle in r.output and not (tmp_path / "x").exists()
