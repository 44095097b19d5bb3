"""PIL decoding as both loaders see it: 8-bit RGB, high-bit-depth samples scaled as DALI's decoder scales them."""
from __future__ import annotations


def pil_rgb(image):
    """A PIL image as 8-bit RGB, scaled as DALI's decoder scales it, so both loaders see the same pixels.

    PIL's own convert("RGB") clips 16-bit samples (PNG, PGM, TIFF: mode I;16 or I) to 255, nearly
    white, and truncates float ones (mode F, in [0, 1]) to 0 or 1; DALI rounds v / 257 and v * 255.
    """
    import numpy as np
    from PIL import Image
    if tiff_int32(image):
        raise ValueError("32-bit integer TIFF samples: DALI's decoder does not read them, so neither loader does")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        v = np.asarray(image, dtype=np.float64)
        v = np.clip(v, 0, 1) * 255 if image.mode == "F" else np.clip(v, 0, 65535) / 257
        gray = np.floor(v + 0.5).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    return image.convert("RGB")


def tiff_int32(image) -> bool:
    """Whether a PIL image is a TIFF of 32-bit integer samples (BitsPerSample 32, SampleFormat not float)."""
    if getattr(image, "format", None) != "TIFF":
        return False
    tags = image.tag_v2
    return 32 in tuple(tags.get(258, ()) or ()) and 3 not in tuple(_as_tuple(tags.get(339, 1)))


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def open_rgb(fp):
    """PIL open + `pil_rgb`: torchvision's ImageFolder loader, with high-bit-depth images scaled as DALI does."""
    from PIL import Image
    with Image.open(fp) as im:
        return pil_rgb(im)


def pil_decodes(data: bytes) -> bool:
    """Whether PIL opens and fully decodes ``data`` as the torch loader does (`open_rgb`)."""
    import io
    try:
        open_rgb(io.BytesIO(data)).load()
        return True
    except Exception:
        return False
