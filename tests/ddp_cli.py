"""Test wrapper: `rmix train` under torchrun with crash hooks, for tests/test_ddp.py.

The hooks are read from the environment here, never by the library:
  RMIX_TEST_CRASH_EPOCH   as that epoch starts, rank RMIX_TEST_CRASH_RANK (default 1) ...
  RMIX_TEST_CRASH_HOW     ... "kill"s itself with SIGKILL (default) or "stall"s (sleeps 10 minutes)
  RMIX_TEST_CRASH_MARKER  crash only while this file does not exist (it is created just before)
  RMIX_TEST_RESULTS       a folder: each rank writes rank{r}.json with the run directory it trains into
  RMIX_TEST_SKEW_CLOCK    give each rank its own default run directory, as clocks that disagree would
"""
import json
import os
import signal
import time
from pathlib import Path

import cli
import rmix.engine as engine

RANK = int(os.environ.get("RANK", "0"))
CRASH_EPOCH = int(os.environ.get("RMIX_TEST_CRASH_EPOCH", "0"))
CRASH_RANK = int(os.environ.get("RMIX_TEST_CRASH_RANK", "1"))
CRASH_HOW = os.environ.get("RMIX_TEST_CRASH_HOW", "kill")
MARKER = os.environ.get("RMIX_TEST_CRASH_MARKER")
RESULTS = os.environ.get("RMIX_TEST_RESULTS")

_train_one_epoch = engine.train_one_epoch


def train_one_epoch(model, policy, loader, optimizer, scaler, cfg, epoch, *args):
    if RESULTS:
        (Path(RESULTS) / f"rank{RANK}.json").write_text(json.dumps({"out": cfg.out, "epoch": epoch}))
    if epoch == CRASH_EPOCH and RANK == CRASH_RANK and not (MARKER and os.path.exists(MARKER)):
        if MARKER:
            Path(MARKER).touch()
        if CRASH_HOW == "stall":
            time.sleep(600)
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_one_epoch(model, policy, loader, optimizer, scaler, cfg, epoch, *args)


engine.train_one_epoch = train_one_epoch
if os.environ.get("RMIX_TEST_SKEW_CLOCK"):
    engine.default_run_dir = lambda cfg: Path("runs") / f"clock-of-rank-{RANK}"

if __name__ == "__main__":
    cli.main()
