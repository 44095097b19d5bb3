"""What the model sees: a few steps of the real loader and policy, the last mixed batch as a PNG grid.

Grid size (deterministic): `cols = ceil(sqrt(N))`, `rows = ceil(N / cols)` for a batch of N; each
cell is `tile + GAP` wide and `tile + top * LINE + GAP` tall (the image, then a caption band of one
line per label); the PNG is `cols * (tile + GAP) + GAP` by `rows * (tile + top * LINE + GAP) + GAP`
pixels. With the defaults (tile 128, top 3, batch 16): 4 x 4 cells, 532 x 688 px.
"""
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from rmix import config as C
from rmix.data import ARRAY_SETS, make_loader, resolve_data
from rmix.mixing import build_policy
from rmix.pipelines.seeds import derive

GAP = 4        # pixels between and around the cells
LINE = 13      # caption line height, pixels
BOX = (255, 40, 40)       # this step's box
OLD_BOX = (255, 210, 0)   # earlier steps' boxes, nested inside it (recursive_mix only)
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def grid_size(n, tile=128, top=3) -> tuple[int, int]:
    """(width, height) in pixels of the grid for a batch of `n` images."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    return cols * (tile + GAP) + GAP, rows * (tile + top * LINE + GAP) + GAP


def mixed_batches(cfg: C.TrainConfig, steps: int):
    """Run the loader and policy of `cfg` for `steps` steps on the CPU; returns what the grid needs.

    There is no model, so `remember` gets logits = log(soft_targets): softmax of those is the
    mixed label itself, the RoI target a perfect model would give. This changes nothing in the
    pixels or labels (RM's pasting reads only images and soft targets).

    Returns (images (N, C, H, W) normalized float, soft_targets (N, K), nested boxes, classes), where
    nested boxes[i] lists image i's boxes, this step's first, each earlier step's mapped into it.
    """
    if steps < 1:
        raise ValueError(f"--steps: must be >= 1, got {steps}")
    C.validate(cfg)
    device = torch.device("cpu")
    root, dataset = resolve_data(cfg.data.data_dir, cfg.data.dataset)
    cfg = C.with_dataset_stats(cfg, dataset)
    if dataset not in ARRAY_SETS:  # as train does (cached): DALI has died of SIGSEGV on batches of bad files
        from rmix import dist
        from rmix.engine import preflight
        preflight(cfg, root, dataset, dist.Dist())
    loader = make_loader(cfg, root, dataset, device, train=True)
    if len(loader) == 0:
        raise ValueError(f"--batch: {cfg.batch_size} is more than the {root} train split holds")
    gen = torch.Generator().manual_seed(derive(cfg.seed, "boxes"))  # rank 0's boxes, as train draws them
    from rmix.engine import mix_settings
    policy = build_policy(cfg.mix.policy, loader.num_classes, **mix_settings(cfg, cfg.mix.policy),
                          mean=cfg.data.mean, std=cfg.data.std, generator=gen)
    rm = cfg.mix.policy == "recursive_mix"
    step, out, nested = 0, None, []
    while step < steps:
        policy.reset()  # an epoch boundary, as the trainer does
        nested = []
        for images, targets in loader:
            out = policy(images, targets)
            h, w = out.images.shape[-2:]
            boxes = [tuple(int(v) for v in b) for b in out.boxes.tolist()]
            if rm:  # the history image i went into box i: its boxes shrink into this one
                nested = [[b] + [_inside(b, old, w, h) for old in (nested[i] if i < len(nested) else [])
                                 if _area(b)] for i, b in enumerate(boxes)]
            else:
                nested = [[b] for b in boxes]
            policy.remember(out.images, out.soft_targets, out.soft_targets.clamp_min(1e-8).log())
            step += 1
            if step == steps:
                break
    return out.images, out.soft_targets, nested, list(loader.classes)


def _area(box):
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


def _inside(outer, box, w, h):
    """`box` of a w x h image, after that image is resized into `outer` (as the paste does)."""
    x1, y1, x2, y2 = outer
    sx, sy = (x2 - x1) / w, (y2 - y1) / h
    bx1, by1, bx2, by2 = box
    return (x1 + bx1 * sx, y1 + by1 * sy, x1 + bx2 * sx, y1 + by2 * sy)


def _font():
    try:
        return ImageFont.load_default(size=11)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def caption(weights, classes, top=3):
    """The `top` largest label weights as lines like 'circle .62' (zero weights left out)."""
    p, idx = torch.as_tensor(weights).float().topk(min(top, len(classes)))
    return [f"{classes[i]} {_frac(v)}" for v, i in zip(p.tolist(), idx.tolist()) if v >= 0.005]


def _frac(v):
    return "1.0" if v >= 0.995 else f"{v:.2f}".lstrip("0")


def draw_grid(images, soft_targets, nested, classes, mean, std, *, tile=128, top=3) -> Image.Image:
    """The batch as a grid of `tile`-pixel tiles (nearest upscale), boxes outlined, label captions below.

    Args:
        images: (N, C, H, W) normalized float; de-normalized with `mean`/`std` (pixel units).
        nested: per image, boxes (x1, y1, x2, y2) in input pixels, the current step's first.
    """
    n, _, h, w = images.shape
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.float().cpu() * std_t + mean_t).clamp(0, 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    width, height = grid_size(n, tile, top)
    cols = math.ceil(math.sqrt(n))
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    sx, sy = tile / w, tile / h
    for i in range(n):
        x0 = GAP + (i % cols) * (tile + GAP)
        y0 = GAP + (i // cols) * (tile + top * LINE + GAP)
        grid.paste(Image.fromarray(pixels[i]).resize((tile, tile), Image.NEAREST), (x0, y0))
        for depth, (x1, y1, x2, y2) in reversed(list(enumerate(nested[i] if i < len(nested) else []))):
            if not _area((x1, y1, x2, y2)):  # nothing pasted
                continue
            left, upper = x0 + x1 * sx, y0 + y1 * sy  # a box deep in the history can be under a pixel wide
            rect = [left, upper, max(left, x0 + x2 * sx - 1), max(upper, y0 + y2 * sy - 1)]
            draw.rectangle(rect, outline=BOX if depth == 0 else OLD_BOX, width=2 if depth == 0 else 1)
        for k, text in enumerate(caption(soft_targets[i], classes, top)):
            draw.text((x0 + 1, y0 + tile + 1 + k * LINE), text, fill=TEXT, font=font)
    return grid


def show(cfg: C.TrainConfig, *, steps=3, out="grid.png", tile=128, top=3) -> tuple[Path, tuple[int, int]]:
    """Mix `steps` batches as `cfg` says and write the last one as a PNG grid; returns (path, size)."""
    if tile < 8:
        raise ValueError(f"--tile: must be >= 8 pixels, got {tile}")
    if top < 1:
        raise ValueError(f"--top: must be >= 1, got {top}")
    cfg = C.with_dataset_stats(cfg, resolve_data(cfg.data.data_dir, cfg.data.dataset)[1])
    images, soft, nested, classes = mixed_batches(cfg, steps)
    grid = draw_grid(images, soft, nested, classes, cfg.data.mean, cfg.data.std, tile=tile, top=top)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, format="PNG")
    return out, grid.size
