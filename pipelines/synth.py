"""The embedded default dataset: procedural shapes, written as JPEGs in ImageFolder layout."""

from __future__ import annotations

import hashlib
import io
import json
import math
import operator
import os
import pathlib
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rmix.pipelines.paths import cache_dir

VERSION = 2  # bump whenever the pixels change, so cached copies are regenerated
# v2: distractors are clutter (blobs, strokes), no longer other classes' shapes shrunk: an image
# shrunk as a whole (RecursiveMix's paste, a zoom-out) then keeps its label true.
MANIFEST = "rmix_synth.json"  # written last; its presence means "complete"
DEFAULT_CLASSES = 10
# Class k is CONCEPTS[k]; a dataset with `classes=n` uses the first n.
CONCEPTS = (
    "circle", "square", "triangle", "star", "cross", "ring",
    "stripes", "crescent", "checker", "arrow", "heart", "frame",
)
DEFAULT_ARGS = dict(
    classes=DEFAULT_CLASSES, train_per_class=100, val_per_class=100,  # small train split: overfits
    width=40, height=40, seed=0, quality=90,
)
_SPLITS = ("train", "val")
_SUPERSAMPLE_PX = 128  # masks are drawn with >= this many pixels on the short side, then box-reduced
_TEXTURE_PX = 375  # short side (px) at which the surface texture is drawn at full strength
# Threads pay off only where PIL/numpy (which release the GIL) dominate: big images.
_PARALLEL_PIXELS = 100_000  # per image



def synth_dataset(out, *, classes=DEFAULT_CLASSES, train_per_class=100, val_per_class=100,  # small train split: overfits
                  width=40, height=40, seed=0, quality=90) -> pathlib.Path:
    """Write a deterministic synthetic ImageFolder dataset to `out` and return it."""
    params = _validate(classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                       width=width, height=height, seed=seed, quality=quality)
    out = pathlib.Path(out).expanduser().absolute()
    if _is_complete(out, params):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a synth dataset with these parameters: {params}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to `out` and rename at the end: a killed run leaves only a hidden
    # `.NAME.partial-*` folder, never a half-written `out`.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        stats = _write_all(tmp, params)
        manifest = dict(generator="rmix.pipelines.synth", version=VERSION, params=params,
                        classes=sorted(CONCEPTS[:classes]),
                        counts={"train": classes * train_per_class, "val": classes * val_per_class},
                        **stats)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above); rename() onto a non-empty dir would fail
        try:
            tmp.rename(out)
        except OSError:
            if not _is_complete(out, params):  # someone else finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_data_dir() -> pathlib.Path:
    """The embedded default dataset, generated into the user cache on first use."""
    path = cache_dir() / _cache_name(DEFAULT_ARGS)
    if not _is_complete(path, _validate(**DEFAULT_ARGS)):  # said once: the next runs find it there
        a = DEFAULT_ARGS
        print(f"rmix: writing the embedded dataset ({a['classes']} classes, {a['train_per_class']} train and "
              f"{a['val_per_class']} val images each, {a['width']} px) into {path}, once (RMIX_CACHE moves it)",
              file=sys.stderr, flush=True)
    return synth_dataset(path, **DEFAULT_ARGS)


def _cache_name(args) -> str:
    """E.g. `shapes10-v1-40px-100+100`; a hash suffix tells apart a non-standard seed/quality."""
    size = f"{args['width']}px" if args["width"] == args["height"] else f"{args['width']}x{args['height']}px"
    name = f"shapes{args['classes']}-v{VERSION}-{size}-{args['train_per_class']}+{args['val_per_class']}"
    rest = {k: args[k] for k in ("seed", "quality")}
    if rest != {k: DEFAULT_ARGS[k] for k in rest}:
        name += "-" + hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8]
    return name


def _validate(**params) -> dict:
    """Check argument ranges; ValueError names the argument and its value."""
    lows = dict(classes=2, train_per_class=1, val_per_class=1, width=8, height=8, seed=0, quality=1)
    highs = dict(classes=len(CONCEPTS), quality=100)
    for name, value in params.items():
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if value < lows[name] or value > highs.get(name, math.inf):
            hi = highs.get(name)
            rng = f"in [{lows[name]}, {hi}]" if hi else f">= {lows[name]}"
            raise ValueError(f"{name} must be {rng}, got {value!r}")
        params[name] = value
    return params


def _is_complete(out: pathlib.Path, params: dict) -> bool:
    """True when `out` holds a finished dataset made with exactly these parameters."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("version") == VERSION and manifest.get("params") == params


def _write_all(root: pathlib.Path, params: dict) -> dict:
    """Render and save every image; return the train set's per-channel mean/std in [0, 1]."""
    jobs = []
    for split_id, split in enumerate(_SPLITS):
        count = params["train_per_class" if split == "train" else "val_per_class"]
        for label in range(params["classes"]):
            folder = root / split / CONCEPTS[label]
            folder.mkdir(parents=True)
            jobs.append((str(folder), split_id, label, count, params))
    big = params["width"] * params["height"] >= _PARALLEL_PIXELS
    workers = min(os.cpu_count() or 1, len(jobs)) if big else 1
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            sums = list(pool.map(_write_class, jobs))
    else:
        sums = [_write_class(job) for job in jobs]
    # Integer sums are exact, so the statistics do not depend on the order of the work.
    train = [s for job, s in zip(jobs, sums) if job[1] == 0]
    n = sum(s[0] for s in train)
    mean = [sum(s[1][c] for s in train) / n for c in range(3)]
    var = [sum(s[2][c] for s in train) / n - mean[c] ** 2 for c in range(3)]
    return dict(mean=[round(m / 255, 4) for m in mean], std=[round(math.sqrt(v) / 255, 4) for v in var])


def _write_class(job) -> tuple:
    """Write one class folder of one split; return (pixels, channel sums, channel sums of squares)."""
    folder, split_id, label, count, params = job
    n, s1, s2 = 0, [0, 0, 0], [0, 0, 0]
    for index in range(count):
        # One stream per image: any single file can be regenerated on its own.
        rng = np.random.default_rng([params["seed"], split_id, label, index])
        pixels = render(rng, label, params["width"], params["height"])
        flat = pixels.reshape(-1, 3).astype(np.int64)
        n += flat.shape[0]
        for c in range(3):
            s1[c] += int(flat[:, c].sum())
            s2[c] += int((flat[:, c] ** 2).sum())
        buf = io.BytesIO()
        # Pillow writes no timestamp, EXIF or comment here, so the bytes depend only on the pixels.
        Image.fromarray(pixels).save(buf, format="JPEG", quality=params["quality"])
        pathlib.Path(folder, f"{index:05d}.jpg").write_bytes(buf.getvalue())
    return n, s1, s2


# ---------------------------------------------------------------- drawing


def render(rng: np.random.Generator, label: int, width: int, height: int) -> np.ndarray:
    """One image of concept `label`: uint8 (height, width, 3)."""
    side = min(width, height)
    # Scene choices (shapes, colours, placement in relative units) come from their own
    # stream, so the same seed draws the same picture at any size; only fine texture differs.
    rng, texture = rng.spawn(2)
    background = _background(rng, texture, width, height)
    canvas = background.copy()
    # Distractors: small (often clipped) clutter that is no concept at all. Were they small
    # copies of other concepts, size would be the class cue, and an image shrunk as a whole
    # (RecursiveMix's paste, any zoom-out) would show its class at a distractor's size.
    for _ in range(rng.integers(0, 4)):
        r = side * rng.uniform(0.06, 0.13)
        cx, cy = rng.uniform(-0.05, 1.05) * width, rng.uniform(-0.05, 1.05) * height
        _draw_clutter(canvas, rng, cx, cy, r, _colour(rng))
    r = side * rng.uniform(0.26, 0.42)
    # Mostly inside the frame, so a random-resized crop usually keeps a recognisable part.
    cx = rng.uniform(0.9 * r, width - 0.9 * r)
    cy = rng.uniform(0.9 * r, height - 0.9 * r)
    _draw_concept(canvas, rng, label, cx, cy, r, _contrasting_colour(rng, background, cx, cy, r))
    _occlude(canvas, background, rng, cx, cy, r)
    # Defocus grows slower than the image, as with a real lens at higher resolution.
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.7) * math.sqrt(side / 40)))
    canvas = _surface_texture(canvas, rng, texture)
    pixels = np.array(canvas, dtype=np.float32)
    pixels += texture.standard_normal(pixels.shape, dtype=np.float32) * rng.uniform(1.0, 6.0)  # sensor grain
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def _background(rng, texture, width, height) -> Image.Image:
    """A gradient plus 1/f-ish colour noise: smooth like a photo, not white noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(theta) + yy * math.sin(theta)) / max(width, height)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    a, b = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    img = (a + (b - a) * t[..., None]).astype(np.float32)
    # Octaves from 2 cells per side up to ~3 pixels per cell; finer ones are weaker, but
    # never below 30 %, so large images keep photo-like fine detail (and JPEG sizes).
    cells, amp = 2, rng.uniform(15, 40)
    floor = 0.3 * amp
    while cells <= max(2, width // 3):
        grid = texture.uniform(0, 255, (max(2, cells * height // width), cells, 3)).astype(np.uint8)
        layer = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)
        img += (layer - np.float32(127.5)) * np.float32(amp / 127.5)
        cells, amp = cells * 2, max(amp * 0.65, floor)
    # Muted backgrounds, like most photos; objects keep their full saturation range.
    grey = img.mean(-1, keepdims=True)
    img = grey + (img - grey) * np.float32(rng.uniform(0.3, 0.9))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _surface_texture(canvas, rng, texture) -> Image.Image:
    """Fine luminance texture over everything, as on real surfaces; gives large JPEGs their detail."""
    w, h = canvas.size
    # Texture has a fixed size in the scene (2 px at _TEXTURE_PX): smaller renders average
    # it away, by the side ratio, as a camera with fewer pixels would.
    strength = rng.uniform(8.0, 20.0) * min(1.0, min(w, h) / _TEXTURE_PX)
    grain = texture.normal(0.0, 1.0, (h // 2 + 1, w // 2 + 1)).astype(np.float32)
    grain = np.asarray(Image.fromarray(grain).resize((w, h), Image.BILINEAR))
    pixels = np.asarray(canvas, dtype=np.float32) + grain[..., None] * strength
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class _Mask:
    """An antialiased L mask: drawn `scale` times larger, box-reduced on `done()`."""

    def __init__(self, size):
        self.scale = max(1, math.ceil(_SUPERSAMPLE_PX / min(size)))
        self.image = Image.new("L", (size[0] * self.scale, size[1] * self.scale), 0)
        self.draw = ImageDraw.Draw(self.image)

    def polygon(self, points, fill=255):
        self.draw.polygon([(x * self.scale, y * self.scale) for x, y in points], fill=fill)

    def box(self, box, ellipse=False):
        box = [v * self.scale for v in box]
        (self.draw.ellipse if ellipse else self.draw.rectangle)(box, fill=255)

    def done(self) -> Image.Image:
        return self.image.reduce(self.scale) if self.scale > 1 else self.image


def _colour(rng) -> tuple:
    """A random saturated-ish RGB colour, independent of the class."""
    h, s, v = rng.uniform(0, 1), rng.uniform(0.25, 1.0), rng.uniform(0.25, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(255 * c) for c in rgb)


def _contrasting_colour(rng, background, cx, cy, r) -> tuple:
    """A random colour that differs enough from the background around the object to be seen."""
    box = [int(max(cx - r, 0)), int(max(cy - r, 0)), int(cx + r) + 1, int(cy + r) + 1]
    ref = np.asarray(background.crop(box), dtype=np.float32).reshape(-1, 3).mean(0)
    for _ in range(8):
        colour = _colour(rng)
        if np.abs(np.asarray(colour) - ref).sum() > 150:
            break
    return colour


def _polygon(unit, cx, cy, r, angle, aspect) -> list:
    """Map unit-radius points to pixels: squash by `aspect`, rotate by `angle`, scale and move."""
    p = np.asarray(unit, dtype=np.float64) * [aspect, 1 / aspect]
    c, s = math.cos(angle), math.sin(angle)
    x = (p[:, 0] * c - p[:, 1] * s) * r + cx
    y = (p[:, 0] * s + p[:, 1] * c) * r + cy
    return list(zip(x.tolist(), y.tolist()))


def _circle(radius=1.0, dx=0.0, n=40):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([radius * np.cos(t) + dx, radius * np.sin(t)], 1)


def _star(points=5, inner=0.42):
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)


def _heart(n=48):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16.5


_SQUARE = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64)
_TRIANGLE = np.array([(0, -1), (0.866, 0.5), (-0.866, 0.5)]) * 1.05
_CROSS = np.array([(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                   (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)])
_ARROW = np.array([(-1, -0.22), (0.05, -0.22), (0.05, -0.65), (1, 0), (0.05, 0.65), (0.05, 0.22), (-1, 0.22)])
# concept -> (filled outline, holes punched out of it); stripes/checker add a pattern below.
_OUTLINES = {
    "circle": ([_circle(0.95)], []),
    "square": ([_SQUARE * 0.8], []),
    "triangle": ([_TRIANGLE], []),
    "star": ([_star()], []),
    "cross": ([_CROSS], []),
    "ring": ([_circle(0.95)], [_circle(0.55)]),
    "stripes": ([_SQUARE * 0.8], []),
    "crescent": ([_circle(0.95)], [_circle(0.8, dx=0.5)]),
    "checker": ([_SQUARE * 0.8], []),
    "arrow": ([_ARROW], []),
    "heart": ([_heart()], []),
    "frame": ([_SQUARE * 0.85], [_SQUARE * 0.5]),
}


def _draw_concept(canvas, rng, label, cx, cy, r, colour):
    """Draw concept `label` centred at (cx, cy) with radius r pixels, random rotation and squash."""
    name = CONCEPTS[label]
    angle = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    mask = _Mask(canvas.size)
    outlines, holes = _OUTLINES[name]
    for unit in outlines:
        mask.polygon(_polygon(unit, cx, cy, r, angle, aspect))
    for unit in holes:
        mask.polygon(_polygon(unit, cx, cy, r, angle, aspect), fill=0)
    canvas.paste(colour, mask=mask.done())
    if name in ("stripes", "checker"):
        # Second colour on alternate bands/cells of the square.
        n = int(rng.integers(3, 5))
        rows = n if name == "checker" else 1
        dx, dy = 1.6 / n, 1.6 / rows
        pattern = _Mask(canvas.size)
        for i in range(n):
            for j in range(rows):
                if (i + j) % 2 == 0:
                    x0, y0 = -0.8 + i * dx, -0.8 + j * dy
                    cell = [(x0, y0), (x0 + dx, y0), (x0 + dx, y0 + dy), (x0, y0 + dy)]
                    pattern.polygon(_polygon(cell, cx, cy, r, angle, aspect))
        canvas.paste(_second_colour(rng, colour), mask=pattern.done())


def _draw_clutter(canvas, rng, cx, cy, r, colour):
    """A shape of no concept at (cx, cy), radius r pixels: an irregular blob or a stroke."""
    mask = _Mask(canvas.size)
    angle = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.5:  # a lumpy blob: radii vary from vertex to vertex, unlike any concept's outline
        n = int(rng.integers(6, 11))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = rng.uniform(0.35, 1.0, n)
        unit = np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    else:  # a bent stroke: two thin bars joined at an angle
        bend = rng.uniform(0.4, 1.2)
        unit = np.array([(-1, -0.12), (0, -0.12), (math.cos(bend), math.sin(bend) - 0.12),
                         (math.cos(bend), math.sin(bend) + 0.12), (0, 0.12), (-1, 0.12)])
    mask.polygon(_polygon(unit, cx, cy, r, angle, 1.0))
    canvas.paste(colour, mask=mask.done())


def _second_colour(rng, colour) -> tuple:
    """A colour clearly different from `colour`, so the pattern's bands are visible."""
    for _ in range(8):
        other = _colour(rng)
        if sum(abs(a - b) for a, b in zip(other, colour)) > 150:
            break
    return other


def _occlude(canvas, background, rng, cx, cy, r):
    """Cover parts of the object with 0-2 patches: solid blobs or holes showing the background."""
    for _ in range(rng.choice(3, p=[0.5, 0.35, 0.15])):
        w, h = r * rng.uniform(0.25, 0.6), r * rng.uniform(0.25, 0.6)
        x, y = cx + r * rng.uniform(-1, 1), cy + r * rng.uniform(-1, 1)
        mask = _Mask(canvas.size)
        mask.box([x - w / 2, y - h / 2, x + w / 2, y + h / 2], ellipse=rng.random() < 0.5)
        canvas.paste(background if rng.random() < 0.5 else _colour(rng), mask=mask.done())
