"""`rmix train --init-from` (#39): a new run starts from an rmix run's, torchvision's or timm's weights. A
classifier of another class count starts fresh with the RoI head, as a run from scratch starts them; every
other tensor is the file's. What does not fit, or is not weights, is one line and writes nothing."""
import hashlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from helpers import RESNET8_16PX
from rmix import checkpoint, engine, init_from
from rmix.cli import cli
from rmix.models import build, load_pretrained

HEAD = ("fc.weight", "fc.bias", "fc_roi.weight", "fc_roi.bias")
ONE_STEP = ["--epochs", "1", "--max-steps", "1", *RESNET8_16PX]


def train(data, out, *extra):
    return CliRunner().invoke(cli, ["train", "--data-dir", str(data), "--out", str(out), *ONE_STEP, *extra])


@pytest.fixture(scope="module")
def ten_classes(jpeg_folder_10x2, tmp_path_factory):
    """latest.pt of a resnet8 run on 10 classes (one step)."""
    out = tmp_path_factory.mktemp("ten") / "run"
    r = train(jpeg_folder_10x2, out)
    assert r.exit_code == 0, r.output
    return out / "latest.pt"


def first_weights(monkeypatch, data, out, *extra):
    """`rmix train ... --ema 0.9`, and the model's weights as its EMA is made from them (before any step)."""
    seen = {}
    real = engine.ModelEma

    def remember(model, *args):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args)
    monkeypatch.setattr(engine, "ModelEma", remember)
    return train(data, out, "--ema", "0.9", *extra), seen


@pytest.mark.slow
def test_a_10_class_run_starts_a_4_class_run_with_a_fresh_head(ten_classes, jpeg_folder_4x6, tmp_path, monkeypatch):
    source = checkpoint.read(ten_classes)["model"]
    scratch, fresh = first_weights(monkeypatch, jpeg_folder_4x6, tmp_path / "scratch")
    assert scratch.exit_code == 0, scratch.output
    # --resume auto with no checkpoint yet is a start: it loads the file
    r, got = first_weights(monkeypatch, jpeg_folder_4x6, tmp_path / "ft", "--init-from", str(ten_classes),
                           "--resume", "auto")
    assert r.exit_code == 0, r.output
    assert got.keys() == source.keys()
    for k in got:
        if k in HEAD:  # as a run from scratch starts them (same seed), not the file's 10-class ones
            assert source[k].shape[0] == 10 and got[k].shape[0] == 4, k
            torch.testing.assert_close(got[k], fresh[k], rtol=0, atol=0, msg=k)
        else:
            torch.testing.assert_close(got[k], source[k], rtol=0, atol=0, msg=k)
    sha = hashlib.sha256(ten_classes.read_bytes()).hexdigest()
    line = (f"--init-from {ten_classes} (rmix checkpoint, sha256 {sha[:12]}): {len(source) - 4} tensors loaded, "
            f"4 started fresh (10 classes in the source, 4 in the model: {', '.join(HEAD)})")
    assert line in r.output.splitlines()
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (config["init_from"], config["init_from_sha256"]) == (str(ten_classes), sha)
    assert json.loads((tmp_path / "scratch" / "config.json").read_text())["init_from_sha256"] == ""

    # the same command relaunched: the run goes on from its checkpoint and reads no --init-from
    def unread(path):
        raise AssertionError(f"read {path}")
    monkeypatch.setattr(init_from, "read", unread)
    r = train(jpeg_folder_4x6, tmp_path / "ft", "--ema", "0.9", "--init-from", str(ten_classes), "--resume", "auto",
              "--epochs", "2", "--allow-changes", "epochs")
    assert r.exit_code == 0, r.output
    assert "--init-from" not in r.output and checkpoint.read(tmp_path / "ft" / "latest.pt")["epoch"] == 2
    assert json.loads((tmp_path / "ft" / "config.json").read_text()) == config


@pytest.mark.slow
def test_init_from_is_refused_on_a_resume(ten_classes, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ten_classes.parent, run)
    before = (run / "latest.pt").read_bytes()
    r = CliRunner().invoke(cli, ["train", "--out", str(run), "--resume", "auto", "--epochs", "2",
                                 "--allow-changes", "epochs", "--init-from", str(ten_classes)])
    assert r.exit_code == 2
    assert r.output.strip() == (f"Error: --init-from: a --resume goes on from the run's own weights in "
                                f"{run / 'latest.pt'} (started from random weights), not {ten_classes}'s; drop "
                                "--init-from to resume, or start a new run from it in a new --out")
    assert (run / "latest.pt").read_bytes() == before


def saved(path, state):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("classes", [4, 10])
@pytest.mark.parametrize("library, name, prefix, file", [
    ("torchvision", "resnet18", "", "resnet18.pth"),
    ("timm", "timm/resnet10t", "body.", "resnet10t.safetensors"),
])
def test_a_library_state_dict_starts_the_matching_model(tmp_path, library, name, prefix, file, classes):
    if library == "torchvision":
        import torchvision
        theirs = torchvision.models.resnet18(num_classes=classes).state_dict()
    else:
        import timm
        theirs = timm.create_model("resnet10t", pretrained=False, num_classes=classes).state_dict()
    source = init_from.read(str(saved(tmp_path / file, theirs)))
    model = build(name, 4)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    line = init_from.load(model, source, name)
    mine = model.state_dict()
    assert mine.keys() == {prefix + k for k in theirs} | {"fc_roi.weight", "fc_roi.bias"}
    head = {prefix + "fc.weight", prefix + "fc.bias"}
    fresh = {"fc_roi.weight", "fc_roi.bias"} | (head if classes != 4 else set())
    for k in theirs:
        want = built[prefix + k] if prefix + k in fresh else theirs[k]
        torch.testing.assert_close(mine[prefix + k], want, rtol=0, atol=0, msg=k)
    for k in fresh:
        torch.testing.assert_close(mine[k], built[k], rtol=0, atol=0, msg=k)
    why = "no fc_roi in the source" if classes == 4 else f"{classes} classes in the source, 4 in the model"
    kind = "safetensors" if file.endswith(".safetensors") else "state dict"
    assert line.startswith(f"--init-from {tmp_path / file} ({kind}, sha256 ")
    assert line.endswith(f"{len(theirs) - len(fresh & head)} tensors loaded, {len(fresh)} started fresh ({why}: "
                         f"{', '.join(k for k in mine if k in fresh)})")


def test_a_source_fc_roi_is_left_unused_by_a_shared_fc_model():
    theirs = build("resnet8", 10).state_dict()
    model = build("resnet8", 10, share_fc=True)
    done = load_pretrained(model, theirs)
    assert (done.fresh, done.unused) == ((), ("fc_roi.weight", "fc_roi.bias"))
    assert model.state_dict().keys() == set(done.loaded) == theirs.keys() - {"fc_roi.weight", "fc_roi.bias"}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0, msg=k)


def renamed(state):
    return {("layer2.0.conv9.weight" if k == "layer2.0.conv1.weight" else k): v for k, v in state.items()}


def reshaped(state):
    return {**state, "layer2.0.conv1.weight": torch.zeros(32, 16, 5, 5)}


@pytest.mark.slow
@pytest.mark.parametrize("change, why", [
    (renamed, "missing key 'layer2.0.conv1.weight' (1 missing, 1 unexpected)"),
    (reshaped, "'layer2.0.conv1.weight' has shape (32, 16, 5, 5) in the checkpoint but (32, 16, 3, 3) in the model"),
])
def test_a_backbone_key_that_does_not_fit_is_one_line_and_writes_nothing(jpeg_folder_4x6, tmp_path, change, why):
    bad = saved(tmp_path / "bad.pt", change(build("resnet8", 10).state_dict()))
    r = train(jpeg_folder_4x6, tmp_path / "run", "--init-from", str(bad))
    assert r.exit_code == 2
    assert r.output.strip() == (f"Error: --init-from: {bad} does not fit --model resnet8: checkpoint does not match "
                                f"the model: {why}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, content, why", [
    ("notes.txt", b"not weights\n", "not a checkpoint (not a file torch.save wrote)"),
    ("missing.pt", None, "no such file"),
    ("meta.pt", {"epoch": 3, "arch": "resnet8"}, "holds no weights (no tensors in it: not a state dict or checkpoint)"),
    ("notes.safetensors", b"not weights\n", "not a safetensors file"),
])
def test_a_file_that_is_not_weights_is_one_line_and_writes_nothing(jpeg_folder_4x6, tmp_path, name, content, why):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    r = train(jpeg_folder_4x6, tmp_path / "run", "--init-from", str(path))
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("Error: --init-from")
    assert f"{path}" in r.output and why in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("names", ["the same", "others"])
def test_a_head_of_the_same_count_loads_only_for_the_same_classes(jpeg_folder_4x6, tmp_path, monkeypatch, names):
    # 4 classes into 4: the classifier's shape fits either way; it means the same only where the names match
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder_4x6, data)
    if names == "others":
        for split in ("train", "val"):
            for i, folder in enumerate(sorted((data / split).iterdir())):
                folder.rename(data / split / f"garment{i}")
    r = train(data, tmp_path / "source")
    assert r.exit_code == 0, r.output
    source = checkpoint.read(tmp_path / "source" / "latest.pt")["model"]
    scratch, fresh = first_weights(monkeypatch, jpeg_folder_4x6, tmp_path / "scratch")
    r, got = first_weights(monkeypatch, jpeg_folder_4x6, tmp_path / "ft", "--init-from",
                           str(tmp_path / "source" / "latest.pt"))
    assert r.exit_code == 0, r.output
    for k in got:
        want = fresh[k] if names == "others" and k in HEAD else source[k]
        torch.testing.assert_close(got[k], want, rtol=0, atol=0, msg=k)
    first = sorted(p.name for p in (jpeg_folder_4x6 / "train").iterdir())[0]
    why = (f"4 started fresh (the source's classes are not the run's: class 0 is 'garment0' there, {first!r} here: "
           f"{', '.join(HEAD)})")
    assert (why in r.output) == (names == "others") and ("none started fresh" in r.output) == (names != "others")
