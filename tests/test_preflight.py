"""`rmix data check`: every kind of unreadable file is named with its reason; good ones pass."""
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rmix.cli import cli
from rmix.pipelines import preflight


def encode(fmt, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    im = Image.fromarray((rng.random((20, 30, 3)) * 255).astype("uint8")).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


GOOD = {"rgb.jpg": lambda: encode("JPEG"), "gray.jpg": lambda: encode("JPEG", "L"),
        "cmyk.jpg": lambda: encode("JPEG", "CMYK"), "png_as.jpg": lambda: encode("PNG")}
BAD = {"zero.jpg": (lambda: b"", "zero-byte"),
       "trunc.jpg": (lambda: encode("JPEG")[:-300], "truncated"),
       "header.jpg": (lambda: encode("JPEG")[:150], "header-only"),
       "text.jpg": (lambda: b"this is not an image\n" * 20, "not an image"),
       "gif.jpg": (lambda: encode("GIF"), "unsupported format (GIF)")}


@pytest.fixture
def folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for name, make in GOOD.items():
                (d / name).write_bytes(make())
    for name, (make, _) in BAD.items():
        (tmp_path / "train" / "b" / name).write_bytes(make())
    return tmp_path


def test_dali_names_every_bad_file_with_its_reason(folder):
    r = CliRunner().invoke(cli, ["data", "check", str(folder), "--json"])
    assert r.exit_code == 1, r.output
    res = json.loads(r.output)
    assert res["ok"] == 4 * len(GOOD) and res["classes"] == 2
    got = {b["path"].rsplit("/", 1)[-1]: b["reason"] for b in res["bad"]}
    assert got == {name: why for name, (_, why) in BAD.items()}


def test_pil_decoder_accepts_gif(folder):
    res = preflight.check([folder / "train"], "pil", use_cache=False)
    got = {b["path"].rsplit("/", 1)[-1] for b in res["bad"]}
    assert got == set(BAD) - {"gif.jpg"}


def test_clean_folder_passes_and_is_cached(folder, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("RMIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    for name in BAD:
        (folder / "train" / "b" / name).unlink()
    r = CliRunner().invoke(cli, ["data", "check", str(folder)])
    assert r.exit_code == 0 and "0 do not" in r.output
    first = preflight.check([folder / "train", folder / "val"])
    calls = []
    monkeypatch.setattr(preflight, "check_split", lambda *a: calls.append(a))
    assert preflight.check([folder / "train", folder / "val"]) == first and not calls  # cache hit
    (folder / "val" / "a" / "rgb.jpg").write_bytes(b"")  # a change invalidates the cache
    monkeypatch.undo()
    assert preflight.check([folder / "val"], use_cache=True)["bad"][0]["reason"] == "zero-byte"


def test_empty_class_folder_and_missing_dir(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(encode("JPEG"))
    r = CliRunner().invoke(cli, ["data", "check", str(tmp_path)])
    assert r.exit_code == 2 and "b" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope" in r.output


@pytest.mark.parametrize("split", ["train", "val"])
def test_training_refuses_a_bad_image_in_either_split_it_reads(folder, tmp_path_factory, monkeypatch, split):
    # the preflight of `rmix train` covers every split it trains or evaluates on
    monkeypatch.setenv("RMIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    for name in BAD:
        (folder / "train" / "b" / name).unlink()
    bad = folder / split / "a" / "trunc.jpg"
    bad.write_bytes(BAD["trunc.jpg"][0]())
    r = CliRunner().invoke(cli, ["train", "--data-dir", str(folder), "--out", str(folder / "run"), "--epochs", "1",
                                 "--batch-size", "4", "--crop-size", "16", "--val-resize", "20", "--model", "resnet8"])
    assert r.exit_code == 2, r.output
    assert str(bad) in r.output and "truncated" in r.output and not (folder / "run" / "latest.pt").exists()


def test_the_cache_sees_a_file_rewritten_with_the_same_size(folder, tmp_path_factory, monkeypatch):
    # same name, same size, other bytes: only the modification time tells; the cache must not hit
    import os
    monkeypatch.setenv("RMIX_CACHE", str(tmp_path_factory.mktemp("cache")))
    for name in BAD:
        (folder / "train" / "b" / name).unlink()
    assert preflight.check([folder / "train"])["bad"] == []
    target = folder / "train" / "a" / "rgb.jpg"
    size, stat = target.stat().st_size, target.stat()
    target.write_bytes(b"\xff\xd8" + b"\x00" * (size - 2))  # garbage of the same length
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a second later, whatever the clock
    assert target.stat().st_size == size
    bad = preflight.check([folder / "train"])["bad"]
    assert [b["path"] for b in bad] == [str(target)]


def crash_on_gif(blobs, threads):
    """In the decoding child: die as DALI has died (SIGSEGV) on a batch holding a GIF."""
    import os
    import signal
    if any(b.startswith(b"GIF8") for b in blobs):
        os.kill(os.getpid(), signal.SIGSEGV)
    return preflight._decodes_in_child(blobs, threads)


def test_a_decoder_that_crashes_fails_its_files_not_the_check(folder, monkeypatch):
    monkeypatch.setattr(preflight, "_decodes_in_child", crash_on_gif)
    ok, bad, classes = preflight.check_split(folder / "train", "dali")
    got = {p.rsplit("/", 1)[-1]: why for p, why in bad}
    assert got == {**{name: why for name, (_, why) in BAD.items()}, "gif.jpg": "crashed the decoder"}
    assert ok == 2 * len(GOOD) and len(classes) == 2


@pytest.mark.slow
def test_data_check_survives_many_undecodable_files_and_prints_only_its_report(tmp_path):
    # GIFs named .jpg and truncated JPEGs, many of each: `rmix data check` once died of SIGSEGV here
    import subprocess
    import sys
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            (d / "good.jpg").write_bytes(encode("JPEG"))
    for k in range(12):
        (tmp_path / "train" / "a" / f"gif{k}.jpg").write_bytes(encode("GIF", seed=k))
        (tmp_path / "train" / "b" / f"trunc{k}.jpg").write_bytes(encode("JPEG", seed=k)[:-300])
    for _ in range(3):
        r = subprocess.run([sys.executable, "-m", "rmix", "data", "check", str(tmp_path), "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # bad files found; not 139
        res = json.loads(r.stdout)
        assert res["ok"] == 4 and len(res["bad"]) == 24
        assert "[ERROR]" not in r.stderr and "jpeg_parser" not in r.stderr, r.stderr[-2000:]


def test_a_pgm_that_dali_would_read_nearly_black_is_named(tmp_path):
    # maxval 1023 (10-bit): DALI decodes it without an error, scaled as 16-bit
    import numpy as np
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            (d / "ok.jpg").write_bytes(encode("JPEG"))
    values = (np.arange(20 * 30) % 1024).astype(">u2").reshape(20, 30)
    (tmp_path / "train" / "a" / "ten.pgm").write_bytes(b"P5\n30 20\n1023\n" + values.tobytes())
    res = preflight.check([tmp_path / "train", tmp_path / "val"], "dali", use_cache=False)
    assert [(b["path"].rsplit("/", 1)[-1], b["reason"]) for b in res["bad"]] == [
        ("ten.pgm", "PGM/PPM with maxval 1023 (DALI reads it nearly black; convert it to 8 or 16 bits)")]
    assert preflight.check([tmp_path / "train"], "pil", use_cache=False)["bad"] == []  # PIL scales it right
