"""timm backbones with the RoI head: a CNN, a ViT (token grid) and an NHWC model build, train two
steps through `rmix train`, and export under timm's own key names, loadable strictly into timm."""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers import train_args
from rmix.cli import cli
from rmix.models import build, roi_pool

timm = pytest.importorskip("timm")

MODELS = ["test_resnet", "test_vit", "test_convnext"]  # timm's own tiny test models: CNN, ViT, ConvNeXt


@pytest.mark.parametrize("name", MODELS)
def test_timm_models_give_logits_and_roi_logits_from_their_last_map(name):
    torch.manual_seed(0)
    model = build(f"timm/{name}", 5, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[0, 0, 64, 64], [8, 16, 40, 48]], dtype=torch.float32)
    logits, roi_logits = model(x, boxes)
    assert logits.shape == roi_logits.shape == (2, 5)
    assert torch.allclose(logits, model.body(x), atol=1e-5)  # timm's own forward, head included
    feat = model.forward_features(x)
    stride = model.body.feature_info[-1]["reduction"]  # the model's, not assumed
    assert model.stride == stride and feat.shape[-2:] == (64 // stride, 64 // stride)
    want = model.fc_roi(roi_pool(feat, boxes, 64, spatial_scale=1 / stride))
    assert torch.allclose(roi_logits, want, atol=1e-6)
    whole = model.fc_roi(feat.mean((2, 3)))  # a whole-image box on an aligned map is its mean
    assert torch.allclose(roi_logits[0], whole[0], atol=1e-5)


def test_an_nhwc_model_is_permuted_to_channels_first():
    # Swin's forward_features is (N, h, w, C) (output_fmt NHWC); a tiny configuration of it
    model = build("timm/swin_tiny_patch4_window7_224", 3, image_size=64, embed_dim=16, depths=(1, 1, 1, 1),
                  num_heads=(1, 1, 1, 1), window_size=2).eval()
    x = torch.randn(2, 3, 64, 64)
    raw = model.body.forward_features(x)
    assert model.body.output_fmt == "NHWC" and raw.shape == (2, 2, 2, 128)
    assert torch.equal(model.forward_features(x), raw.permute(0, 3, 1, 2))
    logits, roi_logits = model(x, torch.tensor([[0, 0, 64, 64], [0, 0, 32, 32]], dtype=torch.float32))
    assert torch.allclose(logits, model.body(x), atol=1e-5) and roi_logits.shape == (2, 3)


def test_a_vits_patch_tokens_are_laid_on_their_grid():
    model = build("timm/test_vit", 3, image_size=48).eval()
    x = torch.randn(1, 3, 48, 48)
    tokens = model.body.forward_features(x)  # (1, 1 + 9, C): the class token, then 3x3 patches row by row
    grid = model.feature_map(tokens, x)
    assert grid.shape == (1, tokens.shape[-1], 3, 3)
    assert torch.equal(grid[0, :, 1, 2], tokens[0, 1 + 1 * 3 + 2])


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_rmix_trains_a_timm_model_and_exports_timms_keys(jpeg_folder_4x6, tmp_path, name):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, out, "--model", f"timm/{name}", "--epochs", "1",
                                           "--max-steps", "2", "--crop-size", "32", "--val-resize", "36"))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_top1"] is not None
    r = CliRunner().invoke(cli, ["export", str(out / "best.pt"), "--out", str(tmp_path / "w.pth")])
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    assert not any(k.startswith(("body.", "fc_roi")) for k in state)
    plain = timm.create_model(name, num_classes=4, img_size=32) if name == "test_vit" else \
        timm.create_model(name, num_classes=4)
    plain.load_state_dict(state, strict=True)  # timm's own model, timm's own names
    x = torch.randn(2, 3, 32, 32)
    ours = build(f"timm/{name}", 4, image_size=32)
    ours.body.load_state_dict(state)
    assert torch.allclose(plain.eval()(x), ours.eval()(x), atol=1e-5)
    r = CliRunner().invoke(cli, ["eval", "--checkpoint", str(out / "best.pt"), "--json"])
    assert r.exit_code == 0, r.output


def test_an_unknown_timm_name_is_one_line(jpeg_folder_4x6, tmp_path):
    r = CliRunner().invoke(cli, train_args(jpeg_folder_4x6, tmp_path / "x", "--model", "timm/no_such_net"))
    assert r.exit_code == 2 and "unknown timm model 'no_such_net'" in r.output
