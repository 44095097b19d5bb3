"""`rmix train --pretrained` (#39): torchvision's and timm's own pretrained weights, from their caches or a
local file (never the network here: every file is written by the test, and a download is made to fail)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from click.testing import CliRunner

from helpers import RESNET8_16PX
from rmix import checkpoint, init_from, pretrained
from rmix.cli import cli
from rmix.models import build

HEAD = ("fc.weight", "fc.bias", "fc_roi.weight", "fc_roi.bias")
ONE_STEP = ["--epochs", "1", "--max-steps", "1", *RESNET8_16PX]


def train(data, out, *extra):
    return CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out), *ONE_STEP, *extra])


def torchvision_file(torch_home: Path, arch="resnet18"):
    """torchvision's DEFAULT weights of `arch` as its cache holds them (random values, the real file name);
    returns (path, state)."""
    import torchvision
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    torch.manual_seed(5)
    state = torchvision.models.get_model(arch, weights=None).state_dict()
    torch.save(state, path)
    return path, state


@pytest.fixture
def no_download(monkeypatch):
    """Any download fails as it does offline."""
    def offline(url, *a, **k):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


def test_torchvision_weights_come_from_its_cache(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path, state = torchvision_file(tmp_path)
    source = pretrained.read("resnet18")
    assert (source.path, source.kind, source.option) == (str(path), "torchvision ResNet18_Weights.IMAGENET1K_V1",
                                                         "--pretrained")
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    model = build("resnet18", 4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    line = init_from.load(model, source, "resnet18", ("a", "b", "c", "d"))
    assert line.startswith(f"--pretrained {path} (torchvision ResNet18_Weights.IMAGENET1K_V1, sha256 "
                           f"{source.sha256[:12]}): {len(state) - 2} tensors loaded, 4 started fresh (1000 classes "
                           "in the source, 4 in the model: fc.weight, fc.bias, fc_roi.weight, fc_roi.bias)"), line
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, fresh[k] if k in HEAD else state[k], rtol=0, atol=0, msg=k)


def test_torchvision_weights_missing_offline_are_one_line_naming_where(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                         no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    r = train(jpeg_folder_4x6, tmp_path / "run", "--model", "resnet18", "--pretrained")
    want = (f"Error: --pretrained: torchvision ResNet18_Weights.IMAGENET1K_V1 is not in torchvision's cache, "
            f"{tmp_path / 'home' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'}, and could not be downloaded from "
            "https://download.pytorch.org/models/resnet18-f37072fd.pth (<urlopen error [Errno -3] Temporary failure in "
            "name resolution>); put the file there (TORCH_HOME moves the cache) or give --pretrained-file")
    assert r.exit_code == 2 and r.output.strip() == want, r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_with_pretrained_records_the_file_and_starts_from_it(jpeg_folder_4x6, tmp_path, monkeypatch,
                                                                     no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    path, state = torchvision_file(tmp_path / "home")
    for how, extra in (("cache", []), ("file", ["--pretrained-file", str(path)])):
        out = tmp_path / how
        r = train(jpeg_folder_4x6, out, "--model", "resnet18", "--crop-size", "32", "--val-resize", "36",
                  "--pretrained", *extra, "--lr", "1e-9")
        assert r.exit_code == 0, r.output
        option = "--pretrained-file" if extra else "--pretrained"
        assert f"{option} {path} (torchvision ResNet18_Weights.IMAGENET1K_V1, sha256" in r.output, r.output
        config = json.loads((out / "config.json").read_text())
        assert config["pretrained"] and config["init_from_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        weights = checkpoint.read(out / "latest.pt")["model"]  # one step at lr 1e-9: still the file's values
        torch.testing.assert_close(weights["conv1.weight"], state["conv1.weight"], rtol=0, atol=1e-6)


def timm_file(tmp_path, suffix):
    timm = pytest.importorskip("timm")
    torch.manual_seed(6)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    return path, state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_come_from_a_local_file_through_timm(tmp_path, suffix):
    path, state = timm_file(tmp_path, suffix)
    source = pretrained.read("timm/resnet18", str(path), 32)
    assert (source.path, source.option, source.kind) == (str(path), "--pretrained-file", "timm resnet18.a1_in1k")
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    model = build("timm/resnet18", 4, image_size=32)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    line = init_from.load(model, source, "timm/resnet18", ("a", "b", "c", "d"))
    assert "1000 classes in the source, 4 in the model: body.fc.weight, body.fc.bias, fc_roi.weight, fc_roi.bias" \
        in line, line
    for k, v in model.state_dict().items():
        if k in ("body.fc.weight", "body.fc.bias", "fc_roi.weight", "fc_roi.bias"):
            torch.testing.assert_close(v, fresh[k], rtol=0, atol=0, msg=k)
        else:
            torch.testing.assert_close(v, state[k.removeprefix("body.")], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_timm_weights_missing_offline_are_one_line_naming_the_cache(jpeg_folder_4x6, tmp_path):
    pytest.importorskip("timm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "th"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "rmix", "train", "--data-dir", str(jpeg_folder_4x6), "--out",
                        str(tmp_path / "run"), *ONE_STEP, "--model", "timm/resnet18", "--pretrained"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"Error: --pretrained: timm resnet18.a1_in1k's weights are not in the Hugging Face "
                               f"cache {tmp_path / 'hf' / 'hub'} (repo timm/resnet18.a1_in1k) and could not be "
                               "downloaded ("), lines[0]
    assert lines[0].endswith("); give --pretrained-file FILE, or fill the cache where there is a network")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet8", "--pretrained"], "--pretrained: --model resnet8 is one of rmix's CIFAR-sized models, which "
                                             "no library publishes weights for; start from a checkpoint with --init-from"),
    (["--pretrained", "--init-from", "x.pt"], "--init-from: a run starts from --init-from or from --pretrained, not "
                                              "both, got 'x.pt'"),
    (["--pretrained-file", "x.pt"], "--pretrained-file: needs --pretrained, got 'x.pt'"),
    (["--model", "resnet18", "--pretrained", "--pretrained-file", "missing.pt"],
     "--pretrained-file: missing.pt: no such file"),
])
def test_pretrained_refusals_are_one_line_and_write_nothing(jpeg_folder_4x6, tmp_path, extra, message):
    r = train(jpeg_folder_4x6, tmp_path / "run", *extra)
    assert r.exit_code == 2 and r.output.strip() == f"Error: {message}", r.output
    assert not (tmp_path / "run").exists()
