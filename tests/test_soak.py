"""`rmix bench soak`: resident memory reaches a plateau over thousands of steps (issue #8).

The fast tests check the plateau arithmetic and the result's shape on a few epochs; the slow
ones (`-m slow`) run the soak itself, 3,000 steps of train/eval alternation per loader.
"""
import json

import pytest
from click.testing import CliRunner

from rmix.bench.soak import LIMIT_PCT, format_soak, plateau, rss_bytes, soak
from rmix.cli import cli


def test_plateau_arithmetic():
    # warm-up = the first 2 samples; reference 100 (the 2nd), max after it 104
    r = plateau([80, 100, 101, 104, 103], 2)
    assert r["warmup_rss"] == 100 and r["max_after"] == 104 and r["final_rss"] == 103
    assert r["growth_pct"] == pytest.approx(4.0) and r["plateau"] is True
    # growth is measured to the largest sample after warm-up, not the last one
    r = plateau([100, 100, 106, 101], 1)
    assert r["growth_pct"] == pytest.approx(6.0) and r["plateau"] is False
    # exactly at the limit fails: "less than 5%"
    assert plateau([100, 105], 1, limit_pct=5)["plateau"] is False
    # shrinking memory is a plateau, with negative growth
    r = plateau([100, 90, 95], 1)
    assert r["growth_pct"] == pytest.approx(-5.0) and r["plateau"] is True
    # warm-up growth does not count
    assert plateau([10, 100, 102], 2)["plateau"] is True
    for bad in (0, 3):
        with pytest.raises(ValueError, match="warm-up"):
            plateau([1, 2, 3], bad)


def test_rss_is_read():
    rss, source = rss_bytes()
    assert rss > 2**20 and source  # a Python process with torch imported: many MB


@pytest.mark.slow
def test_soak_result_and_cli():
    d = soak(40, loader="dali")  # 5 epochs of 8 steps, 10 pipeline builds
    assert d["steps"] == 40 and d["epochs"] == 5 and d["steps_per_epoch"] == 8 and d["pipeline_builds"] == 10
    assert len(d["rss_mb"]) == 5 and all(m > 1 for m in d["rss_mb"])
    assert d["warmup_epochs"] == 1 and d["warmup_rss_mb"] == d["rss_mb"][0] and d["final_rss_mb"] == d["rss_mb"][-1]
    assert d["max_after_warmup_mb"] == max(d["rss_mb"][1:])
    assert d["growth_pct"] == pytest.approx((max(d["rss_mb"][1:]) - d["rss_mb"][0]) / d["rss_mb"][0] * 100)
    assert d["plateau"] == (d["growth_pct"] < LIMIT_PCT) and d["limit_pct"] == LIMIT_PCT
    assert d["loader"] == "dali" and d["model"] == "resnet8" and d["cpu_count"] >= 1
    text = format_soak(d)
    assert "(end of warm-up)" in text and "growth" in text and "limit 5%" in text

    r = CliRunner().invoke(cli, ["bench", "soak", "--steps", "16", "--loader", "torch", "--json"],
                           catch_exceptions=False)
    out = json.loads(r.stdout)  # progress lines go to stderr
    assert out["steps"] == 16 and out["epochs"] == 2 and out["loader"] == "torch" and out["workers"] == 0
    assert len(out["rss_mb"]) == 2 and out["warmup_epochs"] == 1
    assert r.exit_code == (0 if out["plateau"] else 1), r.output


def test_cli_exits_1_without_a_plateau(monkeypatch):
    from rmix.bench import soak as bench_soak
    samples = iter([100 * 2**20, 100 * 2**20, 120 * 2**20, 120 * 2**20])  # +20% in the second epoch
    monkeypatch.setattr(bench_soak, "rss_bytes", lambda: (next(samples), "test"))
    r = CliRunner().invoke(cli, ["bench", "soak", "--steps", "16", "--loader", "torch"])
    assert r.exit_code == 1
    assert "grew 20.00% after warm-up" in r.stderr and "limit 5%" in r.stderr
    assert "NO plateau" in r.stdout


def test_soak_refuses_bad_arguments():
    r = CliRunner().invoke(cli, ["bench", "soak", "--steps", "0"])
    assert r.exit_code == 2 and "--steps: must be >= 1" in r.output


@pytest.mark.heavy
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_soak_memory_plateaus(loader):
    d = soak(3000, loader=loader)
    assert d["steps"] == 3000 and d["pipeline_builds"] == 750
    assert d["growth_pct"] < LIMIT_PCT, format_soak(d)
