"""Test wrapper: `rmix train` under torchrun with crash hooks, for tests/test_ddp.py.

The hooks are read from the environment here, never by the library:
  RMIX_TEST_CRASH_EPOCH   as that epoch starts, rank RMIX_TEST_CRASH_RANK (default 1) ...
  RMIX_TEST_CRASH_HOW     ... "kill"s itself with SIGKILL (default), "stall"s (sleeps 10 minutes) or
                          sends itself SIGTERM ("term") and goes on, as a preempting scheduler would
  RMIX_TEST_CRASH_STEP    ... or, when set, does so right after that step of the epoch (and its mid-epoch save)
  RMIX_TEST_CRASH_MARKER  crash only while this file does not exist (it is created just before)
  RMIX_TEST_RESULTS       a folder: each rank writes rank{r}.json with the run directory it trains into
  RMIX_TEST_SKEW_CLOCK    give each rank its own default run directory, as clocks that disagree would
  RMIX_TEST_NO_COMPILE    record the mode each rank would torch.compile with (RESULTS/compile{r}.json)
                          and run eager: what the engine asks for, without minutes of inductor
  RMIX_TEST_COUNT_REDUCE  count DDP's gradient all-reduces, one per bucket (RESULTS/reduce{r}.json)
"""
import json
import os
import signal
import time
from pathlib import Path

import rmix.engine as engine
from rmix import cli

RANK = int(os.environ.get("RANK", "0"))
CRASH_EPOCH = int(os.environ.get("RMIX_TEST_CRASH_EPOCH", "0"))
CRASH_RANK = int(os.environ.get("RMIX_TEST_CRASH_RANK", "1"))
CRASH_HOW = os.environ.get("RMIX_TEST_CRASH_HOW", "kill")
CRASH_STEP = int(os.environ.get("RMIX_TEST_CRASH_STEP", "0"))
MARKER = os.environ.get("RMIX_TEST_CRASH_MARKER")
RESULTS = os.environ.get("RMIX_TEST_RESULTS")

_train_one_epoch = engine.train_one_epoch


def crash():
    if MARKER:
        Path(MARKER).touch()
    if CRASH_HOW == "stall":
        time.sleep(600)
    if CRASH_HOW == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    os.kill(os.getpid(), signal.SIGKILL)


def train_one_epoch(model, policy, loader, optimizer, scaler, cfg, state, *args, **kwargs):
    if RESULTS:
        (Path(RESULTS) / f"rank{RANK}.json").write_text(json.dumps({"out": cfg.out, "epoch": state.epoch}))
    armed = state.epoch == CRASH_EPOCH and RANK == CRASH_RANK and not (MARKER and os.path.exists(MARKER))
    if armed and not CRASH_STEP:
        crash()
    if armed:  # the stop check runs after each step and its mid-epoch save
        stop = kwargs.get("stop") or (lambda *a, **k: False)

        def crash_then_stop(step, *a, **k):
            if step == CRASH_STEP:
                crash()
            return stop(step, *a, **k)
        kwargs["stop"] = crash_then_stop
    return _train_one_epoch(model, policy, loader, optimizer, scaler, cfg, state, *args, **kwargs)


engine.train_one_epoch = train_one_epoch
if os.environ.get("RMIX_TEST_SKEW_CLOCK"):
    engine.default_run_dir = lambda cfg: Path("runs") / f"clock-of-rank-{RANK}"

if os.environ.get("RMIX_TEST_NO_COMPILE"):
    def compile_model(model, mode):
        (Path(RESULTS) / f"compile{RANK}.json").write_text(json.dumps({"mode": mode}))
        return model
    engine.compile_model = compile_model

if os.environ.get("RMIX_TEST_COUNT_REDUCE"):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    _wrap_ddp, _reduces = engine.wrap_ddp, [0]

    def counting(state, bucket):
        _reduces[0] += 1
        (Path(RESULTS) / f"reduce{RANK}.json").write_text(json.dumps({"buckets": _reduces[0]}))
        return allreduce_hook(state, bucket)

    def wrap_ddp(*args, **kwargs):
        model = _wrap_ddp(*args, **kwargs)
        model.register_comm_hook(None, counting)
        return model
    engine.wrap_ddp = wrap_ddp

if __name__ == "__main__":
    cli.main()
