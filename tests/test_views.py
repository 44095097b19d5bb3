"""What users see: `rmix export` into torchvision models, `rmix show` grids, `rmix plot` curves, plain progress."""
import io
import json

import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image

from rmix import checkpoint
from rmix import config as C
from rmix.cli import cli
from rmix.models import build
from rmix.progress import Progress
from rmix.show import grid_size


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def one_line_error(r, code=2):
    lines = r.output.strip().splitlines()
    assert r.exit_code == code, r.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """An rmix checkpoint of a randomly initialized resnet50 (1000 classes, with its fc_roi)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "r50.pt"
    cfg = C.replace(C.TrainConfig(model="resnet50"), num_classes=1000)
    sd = build("resnet50", 1000).state_dict()
    checkpoint.save(path, {"model": sd, "config": C.to_dict(cfg), "epoch": 1})
    return path, {k: v for k, v in sd.items() if not k.startswith("fc_roi.")}


def test_export_loads_strictly_into_torchvision_resnet50(r50, tmp_path):
    path, sd = r50
    out = tmp_path / "rm_r50.pth"
    r = run(["export", str(path), "--format", "torchvision", "--out", str(out)])
    assert r.exit_code == 0, r.output
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc_roi.") for k in state)
    model = torchvision.models.resnet50()
    model.load_state_dict(state, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, not left behind


def test_export_backbone_loads_into_detection_and_segmentation(r50, tmp_path):
    path, _ = r50
    out = tmp_path / "backbone.pth"
    assert run(["export", str(path), "--out", str(out), "--drop-classifier"]).exit_code == 0
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith(("fc.", "fc_roi.")) for k in state)
    det = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    res = det.backbone.body.load_state_dict(state, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    seg = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)
    res = seg.backbone.load_state_dict(state, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []


def test_export_safetensors_round_trip(r50, tmp_path):
    from safetensors.torch import load_file
    path, sd = r50
    out = tmp_path / "rm_r50.safetensors"
    assert run(["export", str(path), "--out", str(out)]).exit_code == 0  # format from the suffix
    state = load_file(out)
    assert state.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(state[k], v), k


def test_export_small_model_and_errors(tmp_path):
    cfg = C.replace(C.TrainConfig(model="resnet8"), num_classes=4)
    path = tmp_path / "r8.pt"
    sd = build("resnet8", 4).state_dict()
    checkpoint.save(path, {"model": sd, "config": C.to_dict(cfg), "epoch": 1})
    r = run(["export", str(path), "--out", str(tmp_path / "r8.pth"), "--drop-classifier"])
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "r8.pth", weights_only=True).keys() == {
        k for k in sd if not k.startswith(("fc.", "fc_roi."))}
    # the paper's layout: DDP prefixes under state_dict, no rmix config, so --model names it
    paper = tmp_path / "paper.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, paper)
    assert "--model" in one_line_error(run(["export", str(paper), "--out", str(tmp_path / "x.pth")]))
    r = run(["export", str(paper), "--model", "resnet8", "--out", str(tmp_path / "p.safetensors")])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file
    state = load_file(tmp_path / "p.safetensors")
    want = {k: v for k, v in sd.items() if not k.startswith("fc_roi.")}
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert "no EMA" in one_line_error(run(["export", str(path), "--ema", "--out", str(tmp_path / "e.pth")]))
    assert "no such checkpoint" in one_line_error(run(["export", str(tmp_path / "nope.pt"),
                                                       "--out", str(tmp_path / "n.pth")]))
    assert not (tmp_path / "e.pth").exists() and not (tmp_path / "n.pth").exists()


@pytest.mark.parametrize("aug,loader", [("recursive_mix", "dali"), ("recursive_mix", "torch"), ("cutmix", "dali"),
                                        ("mixup", "dali"), ("none", "dali")])
def test_show_writes_a_png_of_the_documented_size(jpeg_folder_4x8_val2, tmp_path, aug, loader):
    out = tmp_path / f"{aug}.png"
    r = run(["show", "--data-dir", str(jpeg_folder_4x8_val2), "--aug", aug, "--loader", loader, "--batch", "4",
             "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "RGB"
        # 2 x 2 tiles of 128 px, gap 4, 3 caption lines of 13 px
        assert im.size == grid_size(4) == (2 * 132 + 4, 2 * (128 + 39 + 4) + 4)


def test_show_is_deterministic_and_draws_the_box(jpeg_folder_4x8_val2, tmp_path):
    from rmix.show import BOX
    args = ["show", "--data-dir", str(jpeg_folder_4x8_val2), "--aug", "recursive_mix", "--batch", "4", "--steps", "3",
            "--seed", "1"]
    for name in ("a.png", "b.png"):
        assert run([*args, "--out", str(tmp_path / name)]).exit_code == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.tobytes() == b.tobytes()
    assert BOX in {c for _, c in a.getcolors(1 << 16)}  # step 3 pasted (alpha 0.5 never draws an empty box here)


def test_draw_grid_with_boxes_under_a_pixel():
    from rmix.show import draw_grid
    nested = [[(2, 2, 20, 20), (5.0, 5.0, 5.1, 5.1)], [(0, 0, 0, 0)]]  # a deep history box; nothing pasted
    grid = draw_grid(torch.zeros(2, 3, 32, 32), torch.tensor([[0.7, 0.3], [1.0, 0.0]]), nested, ["a", "b"],
                     (128.0,) * 3, (64.0,) * 3, tile=64, top=2)
    assert grid.size == grid_size(2, tile=64, top=2) == (2 * 68 + 4, 64 + 26 + 8)


def test_show_rejects_bad_options(jpeg_folder_4x8_val2, tmp_path):
    assert "--steps" in one_line_error(run(["show", "--data-dir", str(jpeg_folder_4x8_val2), "--steps", "0",
                                            "--out", str(tmp_path / "g.png")]))
    assert "--alpha:" in one_line_error(run(["show", "--data-dir", str(jpeg_folder_4x8_val2), "--alpha", "2",
                                                "--out", str(tmp_path / "g.png")]))


def fake_run(d, policy, epochs=4):
    d.mkdir()
    cfg = C.replace(C.TrainConfig(), **{"mix.policy": policy})
    (d / "config.json").write_text(json.dumps(C.to_dict(cfg)))
    rows = [{"epoch": e, "lr": 0.1 / e, "train_loss": 2.0 / e, "train_top1": 20.0 * e, "val_top1": 18.0 * e,
             "val_top5": 50 + 10.0 * e, "val_loss": 2.2 / e, "img_s": 900.0} for e in range(1, epochs + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_plot_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = fake_run(tmp_path / "rm", "recursive_mix"), fake_run(tmp_path / "base", "none", epochs=3)
    out = tmp_path / "curves.png"
    r = run(["plot", str(a), str(b), "--out", str(out), "--title", "RM vs none"])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1000, 750)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import raises ImportError
    line = one_line_error(run(["plot", str(fake_run(tmp_path / "rm", "recursive_mix")), "--out",
                               str(tmp_path / "c.png")]))
    assert line == "Error: rmix plot needs matplotlib: pip install 'rmix[plot]'"


def test_plot_errors_name_the_directory(tmp_path):
    good = fake_run(tmp_path / "rm", "recursive_mix")
    line = one_line_error(run(["plot", str(good), str(tmp_path / "missing"), "--out", str(tmp_path / "c.png")]))
    assert "missing" in line
    (tmp_path / "empty").mkdir()
    assert "metrics.jsonl" in one_line_error(run(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "c.png")]))
    assert not (tmp_path / "c.png").exists()


def test_progress_without_a_terminal_writes_plain_lines():
    stream = io.StringIO()
    with Progress(5, "epoch 1/1", every=2, stream=stream) as bar:
        for _ in range(5):
            bar.update(8, loss=torch.tensor(1.5), lr=0.1)
    Progress.line("epoch 1: done", stream=stream)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [line.split(" img/s")[0] for line in lines[:3]] == [
        "epoch 1/1 step 2/5", "epoch 1/1 step 4/5", "epoch 1/1 step 5/5"]
    assert "loss 1.500" in lines[0] and "lr 0.1" in lines[0] and lines[-1] == "epoch 1: done"


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_show_on_a_file_that_does_not_decode_is_one_line(jpeg_folder_4x8_val2, tmp_path, loader):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(jpeg_folder_4x8_val2, data)
    for p in sorted((data / "train").glob("*/*"))[:3]:
        p.write_bytes(b"GIF89a" + b"\0" * 64)  # not what its .jpg says
    line = one_line_error(run(["show", "--data-dir", str(data), "--loader", loader, "--batch", "32", "--steps", "1",
                               "--out", str(tmp_path / "s.png")]))
    assert "3 unreadable image file(s)" in line and "rmix data check" in line  # checked first, as train does


@pytest.mark.parametrize("out", ["/proc/x.png", "/proc/self/nope/x.png"])
def test_show_to_a_place_that_takes_no_file_names_its_out(jpeg_folder_4x8_val2, tmp_path, out):
    line = one_line_error(run(["show", "--data-dir", str(jpeg_folder_4x8_val2), "--out", out]))
    assert line.startswith(f"Error: --out: cannot write {out}: ") and "Errno" not in line, line


def test_export_to_a_place_that_takes_no_file_names_its_out(tmp_path):
    line = one_line_error(run(["export", str(tmp_path / "missing.pt"), "--out", "/proc/x.pth"]))
    assert "/proc/x.pth" in line and "Errno" not in line, line
