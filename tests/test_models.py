import pytest
import torch
import torchvision
from torchvision.ops import roi_align

from rmix.models import build, count_parameters, list_models, load_state_dict_flexible, model_family, param_count

HEAVY = {"pyramidnet_164_270", "resnet152", "resnext101_32x8d", "resnext101_64x4d",
         "wide_resnet101_2"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: with 2 cores shared, OpenMP threads cost more than they give (10x slower here)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _inputs(name, n=2):
    size = 16 if model_family(name) == "cifar" else 64
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, size, size], [2, 3, size // 2 + 2, size - 1]])[:n]
    return images, boxes


def test_list_models_has_the_contract_names():
    names = list_models()
    assert names == sorted(names)
    for name in ["resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "pyramidnet_200_240",
                 "pyramidnet_164_270", "resnet18", "resnet50", "resnext101_64x4d", "wide_resnet101_2"]:
        assert name in names


def test_parameter_counts():
    assert abs(param_count("pyramidnet_200_240", 10) - 26.75e6) <= 0.01e6  # CutMix paper: 26.8M
    assert param_count("resnet50", 1000) == 25_557_032                       # torchvision's resnet50
    assert param_count("resnet20", 10) == 269_722                            # He et al.: 0.27M
    assert abs(param_count("resnet110", 10) - 1.7e6) < 0.05e6                # He et al.: 1.7M


def test_count_excludes_the_roi_head_only():
    model = build("resnet8", 10)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total - (64 * 10 + 10)
    shared = build("resnet8", 10, share_fc=True)
    assert count_parameters(shared) == count_parameters(model) == sum(p.numel() for p in shared.parameters())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n
                                  for n in list_models()])
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = build(name, 3)
    images, boxes = _inputs(name)
    assert model(images).shape == (2, 3)
    logits, roi_logits = model(images, boxes)
    assert logits.shape == roi_logits.shape == (2, 3)
    (logits.sum() + roi_logits.sum()).backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert model.fc_roi.weight.grad.abs().sum() > 0


def test_roi_logits_are_fc_roi_of_roi_align():
    torch.manual_seed(0)
    model = build("resnet8", 5).eval()
    images = torch.randn(3, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32], [4, 6, 20, 30], [10, 0, 31, 9]])
    logits, roi_logits = model(images, boxes)
    feat = model.forward_features(images)
    rois = torch.cat([torch.arange(3.0)[:, None], boxes.float()], 1)
    pooled = roi_align(feat, rois, output_size=1, spatial_scale=feat.shape[-1] / 32, sampling_ratio=-1,
                       aligned=True)
    torch.testing.assert_close(roi_logits, model.fc_roi(pooled.flatten(1)))
    torch.testing.assert_close(logits, model.fc(feat.mean((2, 3))))
    torch.testing.assert_close(model(images, boxes.float())[1], roi_logits)  # int or float boxes


def test_share_fc_has_no_fc_roi_and_a_full_box_gives_the_logits():
    torch.manual_seed(0)
    model = build("resnet8", 4, share_fc=True).eval()
    assert not any("fc_roi" in k for k in model.state_dict())
    images = torch.randn(2, 3, 32, 32)  # 8x8 feature map: the full box samples each cell once
    logits, roi_logits = model(images, torch.tensor([[0, 0, 32, 32]] * 2))
    torch.testing.assert_close(roi_logits, logits)


def test_bf16_autocast_channels_last_and_bf16_weights():
    torch.manual_seed(0)
    model = build("resnet8", 4).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 19, 27]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, roi_logits = model(images, boxes)
    assert logits.dtype == roi_logits.dtype == torch.bfloat16
    (logits.float().sum() + roi_logits.float().sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    # torchvision's CPU roi_align has no bf16 kernel; the head computes it in float32
    _, roi_logits = model.bfloat16()(images.bfloat16(), boxes)
    assert roi_logits.dtype == torch.bfloat16 and roi_logits.isfinite().all()


def test_bad_inputs_fail_loudly():
    model = build("resnet8", 3)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="4 dims"):
        model(torch.randn(3, 16, 16))


def test_build_errors():
    with pytest.raises(ValueError, match="'resnet9000'.*resnet8"):
        build("resnet9000", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build("resnet8", 0)
    with pytest.raises(ValueError, match="never downloads"):
        build("resnet18", 10, weights="DEFAULT")


def test_timm_is_optional(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'rmix\[timm\]'"):
        build("timm/resnet18", 10)


def test_key_names():
    with torch.device("meta"):
        pyramid = build("pyramidnet_200_240", 10)
        ours, theirs = build("resnet50", 10), torchvision.models.resnet50(num_classes=10)
    keys = set(pyramid.state_dict())
    for key in ["conv1.weight", "bn1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight",
                "layer3.21.bn4.bias", "bn_final.running_var", "fc.weight", "fc_roi.weight", "fc_roi.bias"]:
        assert key in keys, key
    assert pyramid.fc.in_features == (16 + 240) * 4
    assert list(ours.state_dict()) == list(theirs.state_dict()) + ["fc_roi.weight", "fc_roi.bias"]


def _paper_checkpoint(model):
    state = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 300, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_paper_checkpoint_with_module_prefix_loads():
    torch.manual_seed(0)
    source, target = build("resnet8", 10), build("resnet8", 10)
    load_state_dict_flexible(target, _paper_checkpoint(source))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_state_dict_flexible(build("resnet8", 10), old)  # before PyTorch 0.4.1: no num_batches_tracked


def test_wrong_checkpoints_name_the_key():
    model = build("resnet8", 10)
    ckpt = _paper_checkpoint(model)
    del ckpt["state_dict"]["module.layer2.0.conv1.weight"]
    with pytest.raises(ValueError, match="missing key 'layer2.0.conv1.weight'"):
        load_state_dict_flexible(model, ckpt)
    extra = {**model.state_dict(), "head.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected key 'head.weight'"):
        load_state_dict_flexible(model, extra)
    with pytest.raises(ValueError, match=r"'fc.weight'.*\(100, 64\).*\(10, 64\)"):
        load_state_dict_flexible(model, build("resnet8", 100).state_dict())


def test_share_fc_mismatch_is_explained():
    separate, shared = build("resnet8", 10), build("resnet8", 10, share_fc=True)
    with pytest.raises(ValueError, match="share_fc=False.*fc_roi.weight"):
        load_state_dict_flexible(shared, separate.state_dict())
    with pytest.raises(ValueError, match="no fc_roi.*share_fc=True"):
        load_state_dict_flexible(separate, shared.state_dict())
