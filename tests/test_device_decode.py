"""The torchvision loader decoding on the device (--torch-decode device): nvJPEG on a GPU, the same
code on the CPU here. Same crops and flips as the PIL path, the loader contract, bad files named."""
import shutil

import pytest
import torch

from helpers import epoch_ids, loader_of, small_loader
from rmix.pipelines import DecodeError, scan_image_folder


def batches(root, decode, **kw):
    kw = {"train": True, "batch_size": 8, "seed": 3, "crop_size": 16, "val_resize": 20, "workers": 0, **kw}
    return list(loader_of("torch", scan_image_folder(root), torch_decode=decode, **kw))


@pytest.mark.parametrize("train", [True, False])
def test_device_decode_crops_what_the_workers_crop(jpeg_folder_4x6, train):
    pil, dev = batches(jpeg_folder_4x6 / "train", "workers", train=train), batches(jpeg_folder_4x6 / "train", "device",
                                                                                   train=train)
    other = batches(jpeg_folder_4x6 / "train", "device", train=train, seed=4)
    assert len(pil) == len(dev) == 3
    for (a, la), (b, lb), (c, _) in zip(pil, dev, other):
        assert b.dtype == torch.uint8 and b.shape == a.shape and b.is_contiguous() and torch.equal(la, lb)
        # the same boxes and flips: only the decoders' and resizes' rounding differs
        assert (a.float() - b.float()).abs().mean() < 3.0
        if train:  # another seed crops other boxes: the comparison above can fail
            assert (a.float() - c.float()).abs().mean() > 10.0


def test_device_decode_keeps_the_contract(solid_folder_3x5):
    # JPEGs of several sizes, one .JPG, a PNG (decoded by the fallback), a nested folder
    for train in (True, False):
        loader = small_loader("torch", solid_folder_3x5, train=train, batch_size=5, torch_decode="device",
                              workers=1)
        got = epoch_ids(loader)
        assert len(got) == 15 and (train or sorted(got) == sorted(set(got)))


def test_device_decode_names_an_unreadable_file(jpeg_folder_4x6, tmp_path):
    data = tmp_path / "train"
    shutil.copytree(jpeg_folder_4x6 / "train", data)
    bad = sorted((data / sorted(p.name for p in data.iterdir())[0]).iterdir())[0]
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DecodeError) as e:
        for _ in loader_of("torch", scan_image_folder(data), train=False, batch_size=8, crop_size=16, val_resize=20,
                           workers=0, torch_decode="device"):
            pass
    assert e.value.bad_files == [str(bad)]


def test_device_decode_refuses_aug_plus_and_unknown_modes(jpeg_folder_4x6):
    with pytest.raises(ValueError, match="--aug-plus"):
        batches(jpeg_folder_4x6 / "train", "device", aug_plus=True)
    with pytest.raises(ValueError, match="--torch-decode"):
        batches(jpeg_folder_4x6 / "train", "gpu")


def test_device_decode_ignores_exif_orientation_as_pil_and_dali_do(tmp_path):
    # a photo tagged "rotate 90" decodes to the stored pixels on every path, so the loaders agree
    # (TorchCodec's decode_jpeg would turn it: why --torch-decode device keeps torchvision's decoder)
    import numpy as np
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 CW to display
        image.save(tmp_path / cls / "tall.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    kw = dict(train=False, batch_size=2, crop_size=16, val_resize=16, workers=0)
    (pil, _), = list(loader_of("torch", scan_image_folder(tmp_path), torch_decode="workers", **kw))
    (dev, _), = list(loader_of("torch", scan_image_folder(tmp_path), torch_decode="device", **kw))
    (dali, _), = list(loader_of("dali", scan_image_folder(tmp_path), dali_device="cpu", **kw))
    assert (pil.float() - dev.float()).abs().mean() < 3.0 and (pil.float() - dali.float()).abs().mean() < 3.0


def test_high_bit_depth_images_decode_as_dali_decodes_them_on_every_path(tmp_path):
    # 16-bit PNG, PGM and TIFF, and a float TIFF: PIL's convert("RGB") made them white or black
    import numpy as np
    from PIL import Image

    from rmix.pipelines import pil_decodes
    values = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    makers = {"png16.png": lambda p: Image.fromarray(values).save(p, "PNG"),
              "pgm16.pgm": lambda p: Image.fromarray(values).save(p, "PPM"),
              "tif16.tif": lambda p: Image.fromarray(values).save(p, "TIFF"),
              "float.tif": lambda p: Image.fromarray(values.astype(np.float32) / 65535).save(p, "TIFF")}
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for name, write in makers.items():
            write(tmp_path / cls / name)
    assert all(pil_decodes((tmp_path / "a" / name).read_bytes()) for name in makers)
    kw = dict(train=False, batch_size=8, crop_size=16, val_resize=16, workers=0)
    dali = torch.cat([x for x, _ in loader_of("dali", scan_image_folder(tmp_path), dali_device="cpu", **kw)])
    for decode in ("workers", "device"):
        got = torch.cat([x for x, _ in loader_of("torch", scan_image_folder(tmp_path), torch_decode=decode, **kw)])
        assert (got.float() - dali.float()).abs().max() <= 1, decode  # rounding of the resize only
        assert 100 < got.float().mean() < 155  # a gradient of all grey levels, neither white nor black


def test_a_32_bit_integer_tiff_is_refused_by_both_decoders_and_named_as_such(tmp_path):
    # DALI's decoder does not read 32-bit integer samples; PIL would clip them: neither loader takes it
    import numpy as np
    from PIL import Image

    from rmix.pipelines import pil_decodes
    from rmix.pipelines.preflight import _check_items
    path = tmp_path / "int32.tif"
    Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.int32), mode="I").save(path, "TIFF")
    assert not pil_decodes(path.read_bytes())
    for decoder in ("dali", "pil"):
        ok, bad = _check_items([str(path)], lambda i: path.read_bytes(), decoder, 1)
        assert (ok, bad) == (0, [(str(path), "unsupported TIFF: 32-bit integer samples")]), decoder
