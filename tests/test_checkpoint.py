"""Checkpoints: round trip, atomic replace, and refusal of damaged or hostile files."""
import os
import subprocess
import sys

import pytest
import torch

from rmix import checkpoint


def payload():
    return {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "config": {"model": "resnet8"},
            "rng": {"python": (3, tuple(range(5)), None)}}


def test_roundtrip(tmp_path):
    p = tmp_path / "latest.pt"
    checkpoint.save(p, payload())
    got = checkpoint.read(p)
    assert got["epoch"] == 3 and not got["foreign"]
    assert torch.equal(got["model"]["w"], payload()["model"]["w"])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]  # no temp file left


def test_failed_save_keeps_the_previous_file(tmp_path):
    p = tmp_path / "latest.pt"
    checkpoint.save(p, payload())
    before = p.read_bytes()
    with pytest.raises(Exception):
        checkpoint.save(p, {"bad": lambda: 0})  # not serializable: fails mid-save
    assert p.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b"", "empty"),
    (lambda b: b[: len(b) // 2], "cannot read"),
    (lambda b: b"not a checkpoint at all", "cannot read"),
])
def test_damaged_files_name_path_and_reason(tmp_path, damage, reason):
    p = tmp_path / "c.pt"
    checkpoint.save(p, payload())
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(checkpoint.CheckpointError, match=reason) as e:
        checkpoint.read(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_bit_flip_in_payload_is_caught(tmp_path):
    p = tmp_path / "c.pt"
    checkpoint.save(p, payload())
    data = bytearray(p.read_bytes())
    # flip a byte inside the stored tensor data (the payload), where the zip CRC may not be checked
    i = data.find(b"resnet8")
    assert i > 0
    data[i] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=str(p)):
        checkpoint.read(p)


def test_missing_file(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.read(tmp_path / "nope.pt")


def test_foreign_layout_is_returned_as_is(tmp_path):
    p = tmp_path / "paper.pt"
    torch.save({"epoch": 300, "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, p)
    got = checkpoint.read(p)
    assert got["foreign"] and list(checkpoint.model_state(got)) == ["module.fc.weight"]


EVIL = """
import os, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
torch.save({{"model": Evil()}}, {path!r})
"""


def test_malicious_pickle_never_runs(tmp_path):
    marker, p = tmp_path / "pwned", tmp_path / "evil.pt"
    subprocess.run([sys.executable, "-c", EVIL.format(marker=marker, path=str(p))], check=True)
    assert not marker.exists()
    code = ("import sys; from rmix import checkpoint\n"
            "try:\n    checkpoint.read(sys.argv[1])\nexcept checkpoint.CheckpointError as e:\n    print(e)\n")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(p)], env=env, capture_output=True, text=True)
    assert not marker.exists(), "the payload ran"
    assert "refused" in r.stdout or "cannot read" in r.stdout, r.stdout + r.stderr
