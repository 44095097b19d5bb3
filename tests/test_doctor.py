"""`rmix doctor` on a CPU: what it can check passes, the GPU lines say they need one, and each check
fails when what it checks is broken."""
import json

import pytest
import torch
from click.testing import CliRunner

from rmix import doctor
from rmix.cli import cli


@pytest.mark.slow
def test_doctor_on_a_cpu_checks_what_it_can_and_names_what_needs_a_gpu():
    r = CliRunner().invoke(cli, ["doctor", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    checks = {c["check"]: c for c in d["checks"]}
    assert d["ok"] and d["versions"]["torch"] == torch.__version__
    for name in ("torch", "torchvision", "DALI", "fused op: torch reference", "decode: DALI CPU vs PIL",
                 "decode: torch loader device path vs workers", "train: dali loader", "train: torch loader"):
        assert checks[name]["status"] == "ok", checks[name]
    for name in ("fused op: Triton on the GPU", "train: torch loader, --torch-decode device"):
        assert checks[name]["status"] == "needs a GPU", checks[name]
    assert "host syncs per step 0" in checks["train: dali loader"]["detail"]
    assert "img/s" in checks["train: torch loader"]["detail"]


def test_the_table_has_a_line_per_check_and_says_how_it_ended():
    d = {"versions": doctor.versions(torch.device("cpu")), "ok": False,
         "checks": [doctor.Line("a", "ok", "fine")._asdict(), doctor.Line("bb", "failed", "broken")._asdict()]}
    text = doctor.format_doctor(d)
    assert text.splitlines()[1:] == ["a   ok      fine", "bb  failed  broken", "1 check(s) failed"]


@pytest.mark.parametrize("dali_wheel,torch_cuda,status", [
    ("nvidia-dali-cuda120", "13.0", "failed"), ("nvidia-dali-cuda130", "13.0", "ok"),
    ("nvidia-dali-cuda120", "12.8", "ok"), ("nvidia-dali-cuda130", None, "ok")])
def test_dalis_cuda_build_must_be_torchs(dali_wheel, torch_cuda, status):
    v = {**doctor.versions(torch.device("cpu")), "dali": "2.4.0", "dali_wheel": dali_wheel, "torch_cuda": torch_cuda}
    line = next(x for x in doctor.version_lines(v) if x.check == "DALI")
    assert line.status == status, line
    if status == "failed":
        assert "pip uninstall nvidia-dali-cuda120 && pip install nvidia-dali-cuda130" in line.detail


def test_a_missing_dali_is_a_warning_that_says_what_to_install():
    v = {**doctor.versions(torch.device("cpu")), "dali": None, "dali_wheel": None}
    line = next(x for x in doctor.version_lines(v) if x.check == "DALI")
    assert line.status == "warning" and "pip install nvidia-dali-cuda" in line.detail and "--loader torch" in line.detail


def test_the_reference_check_sees_a_wrong_reference(monkeypatch):
    from rmix.kernels import mix_ref
    assert doctor.reference_check()[0] == "ok"
    real = mix_ref.recursive_mix_ref

    def shifted(*a, **kw):  # a paste one row too low
        out, soft, lam = real(*a, **kw)
        return out.roll(1, dims=2), soft, lam
    monkeypatch.setattr(mix_ref, "recursive_mix_ref", shifted)
    status, detail = doctor.reference_check()
    assert status == "failed" and "differs from the paper's unfused steps" in detail


def test_the_decode_comparison_fails_beyond_its_tolerance():
    a = torch.full((4, 4, 3), 100, dtype=torch.uint8)
    assert doctor._compare([(a, a + 1)], 1.5, "x")[0] == "ok"
    status, detail = doctor._compare([(a, a + 2)], 1.5, "x")
    assert status == "failed" and "mean |difference| 2.00" in detail
    assert doctor._compare([(a, a[:2])], 1.5, "x")[0] == "failed"


def test_a_check_that_raises_is_a_failed_line_not_a_traceback():
    line = doctor._timed("boom", lambda: 1 / 0)
    assert line.status == "failed" and line.detail.startswith("ZeroDivisionError")


@pytest.mark.slow
def test_a_step_that_reads_a_device_value_fails_the_train_check(monkeypatch):
    from rmix import engine
    real = engine.train_step

    def reads(*a, **kw):
        out = real(*a, **kw)
        out[0].item()  # a host read in every step
        return out
    monkeypatch.setattr(engine, "train_step", reads)
    status, detail = doctor.train_check(torch.device("cpu"), "torch")
    assert status == "failed" and "host syncs per step 1" in detail, detail
