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


def test_a_value_that_cannot_be_stored_is_refused_before_writing(tmp_path):
    p = tmp_path / "latest.pt"
    checkpoint.save(p, payload())
    before = p.read_bytes()
    with pytest.raises(TypeError, match="cannot store a function"):
        checkpoint.save(p, {"bad": lambda: 0})
    assert p.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_an_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "latest.pt"
    checkpoint.save(p, payload())
    before = p.read_bytes()

    def half_then_interrupt(f, data):  # as Ctrl-C (or a kill the process sees) halfway through
        f.write(data[: len(data) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "_write", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(p, {**payload(), "epoch": 4})
    assert p.read_bytes() == before and checkpoint.read(p)["epoch"] == 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b"", "empty"),
    (lambda b: b[: len(b) // 2], "cannot read"),
    (lambda b: b"not a checkpoint at all", "not a file torch.save wrote"),
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


@pytest.mark.slow
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


def _save_v1(path, payload):
    """How rmix wrote checkpoints until 2026-12 (version 1): the content in a verified byte tensor."""
    import hashlib
    import io
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    torch.save({"format": "rmix-checkpoint", "version": 1, "sha256": hashlib.sha256(data).hexdigest(),
                "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, path)


def test_a_checkpoint_is_a_plain_dict_that_loads_the_usual_way(tmp_path):
    from rmix.models import build
    model = build("resnet8", 4)
    p = tmp_path / "best.pt"
    checkpoint.save(p, {"model": model.state_dict(), "epoch": 2, "config": {"model": "resnet8"}})
    plain = torch.load(p, weights_only=True)
    assert {"model", "epoch", "config", "rmix"} <= set(plain)
    fresh = build("resnet8", 4)
    fresh.load_state_dict(plain["model"], strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_version_1_files_are_still_read_and_verified(tmp_path):
    p = tmp_path / "old.pt"
    _save_v1(p, payload())
    got = checkpoint.read(p)
    assert got["epoch"] == 3 and not got["foreign"] and torch.equal(got["model"]["w"], payload()["model"]["w"])
    data = bytearray(p.read_bytes())
    data[data.find(b"resnet8")] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch|cannot read"):
        checkpoint.read(p)


def test_a_flipped_weight_byte_is_refused(tmp_path):
    p = tmp_path / "c.pt"
    w = torch.full((64,), 1.5)
    checkpoint.save(p, {"model": {"w": w}, "epoch": 1})
    data = bytearray(p.read_bytes())
    i = data.find(torch.tensor([1.5]).numpy().tobytes() * 64)  # the weight's stored bytes
    assert i > 0
    data[i + 9] ^= 0x40
    p.write_bytes(bytes(data))
    flipped = torch.load(p, weights_only=True)["model"]["w"]
    assert not torch.equal(flipped, w)  # torch loads it silently with another value ...
    with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch"):
        checkpoint.read(p)  # ... rmix refuses it


def test_a_failing_write_keeps_the_previous_file_and_names_path_and_reason(tmp_path, monkeypatch):
    import errno
    p = tmp_path / "latest.pt"
    checkpoint.save(p, payload())
    before = p.read_bytes()

    def full(f, data):
        f.write(data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write", full)
    with pytest.raises(checkpoint.SaveError, match=f"cannot write {p}: No space left on device") as e:
        checkpoint.save(p, {**payload(), "epoch": 4})
    assert "\n" not in str(e.value)
    assert p.read_bytes() == before and checkpoint.read(p)["epoch"] == 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_a_file_size_limit_is_a_save_error_not_a_crash(tmp_path):
    # for real: RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) once the file passes 64 KiB
    code = f"""
import resource, signal, torch
from rmix import checkpoint
checkpoint.save({str(tmp_path / 'c.pt')!r}, {{"model": {{"w": torch.zeros(4)}}}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
try:
    checkpoint.save({str(tmp_path / 'c.pt')!r}, {{"model": {{"w": torch.zeros(100000)}}}})
except checkpoint.SaveError as e:
    print("SaveError:", e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SaveError: cannot write" in r.stdout and "File too large" in r.stdout
    assert checkpoint.read(tmp_path / "c.pt")["model"]["w"].shape == (4,)


def test_a_save_writes_a_temporary_file_beside_the_target_flushed_and_synced_before_the_rename(tmp_path, monkeypatch):
    # a temporary file elsewhere breaks the rename across filesystems ("Invalid cross-device link");
    # a rename before fsync can leave an empty file after a power loss
    import tempfile
    events, real = [], {"mkstemp": tempfile.mkstemp, "fsync": os.fsync, "replace": os.replace}

    def mkstemp(*a, **kw):
        fd, name = real["mkstemp"](*a, **kw)
        events.append(("mkstemp", os.path.dirname(name), fd))
        return fd, name

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, os.fstat(fd).st_size))
        return real["fsync"](fd)

    def replace(src, dst):
        events.append(("replace", src, dst))
        return real["replace"](src, dst)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run" / "latest.pt"
    out.parent.mkdir()
    checkpoint.save(out, {"w": torch.ones(1000)})
    monkeypatch.undo()
    kinds = [e[0] for e in events]
    assert kinds == ["mkstemp", "fsync", "replace", "fsync"], events
    (_, where, _), (_, synced, size), (_, src, dst), (_, dir_synced, _) = events
    assert where == str(out.parent) and synced == src and dst == str(out)  # beside the target, synced, renamed
    assert size == out.stat().st_size  # every byte written (flushed) before the sync
    assert dir_synced == str(out.parent)  # then the directory, so the rename itself is durable


def test_a_save_onto_another_filesystem_than_the_temporary_directory_works(monkeypatch):
    # /dev/shm is a tmpfs: a temporary file in the default temporary directory could not be renamed there
    import tempfile
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev:
        pytest.skip("no second filesystem beside the temporary directory")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        out = os.path.join(d, "latest.pt")
        checkpoint.save(out, {"w": torch.arange(4)})
        assert torch.equal(checkpoint.read(out)["w"], torch.arange(4))
        assert os.listdir(d) == ["latest.pt"]


# --- what the mutation run found untested in rmix/checkpoint.py ---

def test_a_version_2_file_as_rmix_writes_it_reads(tmp_path):
    # the format on disk, built by hand: a plain dict with {"rmix": {"format", "version": 2, "sha256"}}
    payload = {"model": {"w": torch.arange(3.0)}, "epoch": 4, "config": {"seed": 1}, "rng": [1, 2]}
    # the digest as version 2 defines it, fixed here: files written with it must stay readable
    sha = "bfd65c79a7795ce7ca608ff1b73e5060d9dffe82627c44dff193a816a02ece17"
    torch.save({**payload, "rmix": {"format": "rmix-checkpoint", "version": 2, "sha256": sha}}, tmp_path / "v2.pt")
    got = checkpoint.read(tmp_path / "v2.pt")
    assert got["epoch"] == 4 and torch.equal(got["model"]["w"], torch.arange(3.0)) and got["foreign"] is False
    checkpoint.save(tmp_path / "now.pt", payload)
    assert torch.load(tmp_path / "now.pt", weights_only=True)["rmix"]["version"] == 2


def test_the_digest_sees_every_value_inside_lists_and_tuples():
    base = {"rng": [1, [2, 3]], "t": (torch.ones(2),)}
    assert checkpoint.digest(base) != checkpoint.digest({"rng": [1, [2, 4]], "t": (torch.ones(2),)})
    assert checkpoint.digest(base) != checkpoint.digest({"rng": [1, [2, 3]], "t": (torch.zeros(2),)})
    assert checkpoint.digest(base) == checkpoint.digest({"rng": (1, (2, 3)), "t": [torch.ones(2)]})


def test_an_os_error_without_a_reason_is_still_one_line_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_write", lambda f, data: (_ for _ in ()).throw(OSError()))
    with pytest.raises(checkpoint.SaveError, match=r"cannot write .*x\.pt: Input/output error; the previous x\.pt"):
        checkpoint.save(tmp_path / "x.pt", {"a": 1})
    assert os.listdir(tmp_path) == []  # no temporary file left


def test_a_temporary_file_that_cannot_be_made_is_a_save_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    def refuse(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(checkpoint.SaveError, match="No space left on device"):
        checkpoint.save(tmp_path / "x.pt", {"a": 1})


def test_a_cleanup_that_fails_does_not_hide_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_write", lambda f, data: (_ for _ in ()).throw(OSError(5, "I/O error")))
    monkeypatch.setattr(os, "unlink", lambda p: (_ for _ in ()).throw(OSError(13, "denied")))
    with pytest.raises(checkpoint.SaveError, match="I/O error"):
        checkpoint.save(tmp_path / "x.pt", {"a": 1})


def test_a_directory_that_cannot_be_synced_still_saves(tmp_path, monkeypatch):
    real_open = os.open

    def no_dirs(path, flags, *a):
        if os.path.isdir(path):
            raise OSError(13, "Permission denied")
        return real_open(path, flags, *a)
    monkeypatch.setattr(os, "open", no_dirs)
    checkpoint.save(tmp_path / "x.pt", {"a": torch.ones(2)})
    monkeypatch.undo()
    assert torch.equal(checkpoint.read(tmp_path / "x.pt")["a"], torch.ones(2))


def test_a_legacy_pickle_file_is_read_as_foreign(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    got = checkpoint.read(tmp_path / "old.pth")
    assert got["foreign"] and got["epoch"] == 3 and torch.equal(checkpoint.model_state(got)["w"], torch.ones(2))


class NotPlainData:
    """A class a stranger's checkpoint could reference: weights_only unpickling refuses it."""


def test_a_refused_unpickling_says_why_in_one_line(tmp_path):
    torch.save({"model": torch.ones(1), "extra": NotPlainData()}, tmp_path / "odd.pt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read(tmp_path / "odd.pt")
    assert str(e.value) == (f"{tmp_path / 'odd.pt'}: cannot read checkpoint: it contains Python objects that are "
                            "not plain data (refused to unpickle)")


def test_an_unreadable_file_is_named_with_the_first_line_of_the_reason(tmp_path):
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # a zip's magic, nothing after it
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read(tmp_path / "cut.pt")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'cut.pt'}: cannot read checkpoint: ") and "\n" not in message
    assert not message.endswith(": ") and "unpickle" not in message  # torch's own reason, not the pickle story


def test_model_and_ema_states_of_rmix_paper_and_timm_checkpoints(tmp_path):
    w = {"fc.weight": torch.ones(2, 2)}
    assert checkpoint.model_state({"model": w, "foreign": False}) is w
    assert checkpoint.model_state({"state_dict": w, "epoch": 1, "foreign": True}) == w  # the paper's
    assert checkpoint.model_state({**w, "foreign": True}) == w  # a bare state dict
    assert checkpoint.ema_state({"ema": {"model": w, "updates": 3}}, "x.pt") is w  # rmix's --ema
    assert checkpoint.ema_state({"state_dict_ema": w}, "x.pt") is w  # timm's
    with pytest.raises(ValueError, match="--ema: x.pt has no EMA weights"):
        checkpoint.ema_state({"model": w}, "x.pt")


def test_the_reason_is_the_first_line_of_torchs_own(tmp_path, monkeypatch):
    import zipfile
    with zipfile.ZipFile(tmp_path / "cut.pt", "w") as z:  # a whole zip, but not torch's archive
        z.writestr("x.txt", "not a checkpoint")
    with pytest.raises(Exception) as raw:
        torch.load(tmp_path / "cut.pt", weights_only=True)
    first = str(raw.value).strip().splitlines()[0]
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read(tmp_path / "cut.pt")
    assert str(e.value) == f"{tmp_path / 'cut.pt'}: cannot read checkpoint: {first}"
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("first line\nsecond line")))
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint: first line$"):
        checkpoint.read(tmp_path / "cut.pt")


def test_any_weights_only_refusal_is_told_as_not_plain_data(tmp_path, monkeypatch):
    # torch words its refusals several ways; "Unsupported global" is only one of them
    import pickle
    (tmp_path / "odd.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    message = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
               "succeed\nWeightsUnpickler error: Trying to call reduce for unrecognized function")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(pickle.UnpicklingError(message)))
    with pytest.raises(checkpoint.CheckpointError, match=r"not plain data \(refused to unpickle\)$"):
        checkpoint.read(tmp_path / "odd.pt")


@pytest.mark.parametrize("keep", [20_000, 0.5])
def test_a_checkpoint_cut_short_says_so(tmp_path, keep):
    path = tmp_path / "latest.pt"
    checkpoint.save(path, {"model": {"w": torch.randn(50_000)}, "epoch": 1})
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(checkpoint.CheckpointError, match=r"latest.pt: cannot read checkpoint: truncated or damaged "
                                                         r"\(torch's zip has no directory at its end"):
        checkpoint.read(path)
