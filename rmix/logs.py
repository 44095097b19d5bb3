"""Run logs: where the training loop's numbers go, so the loop itself writes none of them.

The loop calls `RunLogs.epoch(row)` once per epoch, before its checkpoint (a resume trims
metrics.jsonl's rows past latest.pt), `RunLogs.announce(row, best)` after it, and, where a backend
wants steps, `RunLogs.step(...)` every --log-every steps with the values the progress line reads
back there (one sync each time; with the line hidden, these rows are what still read them).
Every backend receives the same keys: the epoch row (epoch, lr, train_loss, train_top1,
val_top1, val_top5, val_loss, img_s, and the EMA's with --ema) and the step row (`STEP_KEYS`).

- metrics.jsonl, always: one JSON object per epoch; `rmix plot`, `--resume` and the tests read it.
  Writing it can fail only as a checkpoint can (the disk), and then the run stops, as for one.
- TensorBoard (RUN/tb) whenever its extra is installed (`pip install 'rmix[tensorboard]'`).
- Weights & Biases with `--log wandb` (`pip install 'rmix[wandb]'`): project $WANDB_PROJECT or
  "rmix", the run directory's name, the resolved config; files under RUN/wandb. With
  WANDB_MODE=offline nothing leaves the machine (`wandb sync RUN/wandb/offline-run-*` later). A
  resumed run continues the same W&B run (its id is kept in RUN/wandb_id).
An optional backend that raises (at start or later) is one warning and is off for the rest of the
run: metrics.jsonl, the checkpoints and the training go on unchanged.
"""
import importlib.util
import json
import os
import uuid
from functools import partial
from pathlib import Path

from rmix.config import LOGS as BACKENDS  # what --log may name; metrics.jsonl always, TensorBoard when installed
from rmix.pipelines.errors import one_line
from rmix.progress import Progress

STEP_KEYS = ("global_step", "step/loss", "step/lr", "step/img_s")
_EXTRAS = {"wandb": ("wandb", "rmix[wandb]")}


def check_backends(names) -> None:
    """ValueError naming a --log backend that is unknown or not installed; run on every rank before training."""
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"--log: {name!r} is none of {', '.join(BACKENDS)}")
        module, extra = _EXTRAS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"--log {name}: the {module} package is not installed (pip install '{extra}')")


def metrics_rows(path: Path) -> list[str]:
    """The lines of a metrics.jsonl that are rows ({"epoch": int, ...}), read only.

    A last line cut off mid-append (a kill while writing it) is left out: its epoch is not in
    latest.pt either. Any other line that is not a row is an error naming the file and the line.
    """
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows, last = [], None
    for k, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("epoch"), int)):
            raise ValueError(f"--resume: {path}, line {k + 1}, is not a metrics row ({line[:60]!r}); "
                             "remove or repair it")
        if last is not None and row["epoch"] <= last:  # one row an epoch, in order: a repeated or moved row is no run's
            raise ValueError(f"--resume: {path}, line {k + 1}, is epoch {row['epoch']} after epoch {last}; "
                             "each epoch has one row, in order: remove or repair it")
        last = row["epoch"]
        rows.append(line)
    return rows


def trim_metrics(path: Path, start: int) -> None:
    """Drop rows of epochs >= start: a restart between a metrics row and its latest.pt would repeat them."""
    if path.is_file():
        rows = [line for line in metrics_rows(path) if json.loads(line)["epoch"] < start]
        path.write_text("".join(line + "\n" for line in rows))


class Jsonl:
    name, wants_steps = "metrics.jsonl", False

    def __init__(self, run_dir: Path, cfg: dict, start: int):
        self.path = run_dir / "metrics.jsonl"
        trim_metrics(self.path, start)

    def epoch(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self, exit_code: int = 0) -> None:
        pass


def trim_events(files, keep) -> None:
    """Rewrite TensorBoard event files without the scalars `keep(tag, step)` refuses (as trim_metrics)."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    for path in files:
        records = list(RawEventFileLoader(str(path)).Load())
        events = [Event.FromString(r) for r in records]
        kept = [r for r, e in zip(records, events) if all(keep(v.tag, e.step) for v in e.summary.value)]
        if len(kept) == len(records):
            continue
        tmp = Path(str(path) + ".trim")
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for r in kept:
                writer.write(r)
        os.replace(tmp, path)


class TensorBoard:
    """RUN/tb: epoch rows at step = epoch, step rows (tags step/...) at the global step.

    On resume the events a killed run wrote after its last checkpoint are trimmed, as metrics.jsonl's
    rows are: epoch rows of epochs >= start at once, step rows from the first step logged again.
    """
    name, wants_steps = "TensorBoard", True

    def __init__(self, run_dir: Path, cfg: dict, start: int):
        from torch.utils.tensorboard import SummaryWriter
        self.earlier = sorted((run_dir / "tb").glob("events.out.tfevents.*"))  # the runs before this one's
        trim_events(self.earlier, lambda tag, step: tag.startswith("step/") or step < start)
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def epoch(self, row: dict) -> None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def step(self, values: dict) -> None:
        if self.earlier:  # the first step of this run: the earlier runs' step rows from it on are its own now
            first = values["global_step"]
            trim_events(self.earlier, lambda tag, step: not tag.startswith("step/") or step < first)
            self.earlier = []
        for k, v in values.items():
            if k != "global_step" and v is not None:
                self.writer.add_scalar(k, v, values["global_step"])

    def close(self, exit_code: int = 0) -> None:
        self.writer.close()


class Wandb:
    name, wants_steps = "W&B", True

    def __init__(self, run_dir: Path, cfg: dict, start: int):
        import wandb
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]  # W&B's id form
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "rmix", name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=cfg)
        id_file.write_text(run_id + "\n")
        self.run.define_metric("epoch")
        self.run.define_metric("global_step")
        self.run.define_metric("step/*", step_metric="global_step")
        self.run.define_metric("*", step_metric="epoch")

    def epoch(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if v is not None})

    def step(self, values: dict) -> None:
        self.run.log({k: v for k, v in values.items() if v is not None})

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


OPTIONAL = {"tensorboard": TensorBoard, "wandb": Wandb}


class RunLogs:
    """The run's logs on the main rank (`enabled`), nothing on the others; `show`: the console line too."""

    def __init__(self, run_dir: Path, cfg: dict, start: int, *, backends=(), show=False, enabled=True):
        self.show, self.eval_every = show and enabled, cfg.get("eval_every", 1)
        self.optional = []
        self.jsonl = Jsonl(run_dir, cfg, start) if enabled else None
        if not enabled:
            return
        names = (["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []) + list(backends)
        for name in names:
            try:
                self.optional.append(OPTIONAL[name](run_dir, cfg, start))
            except Exception as e:  # a logger must not cost the run
                self._warn(OPTIONAL[name].name, "start", e)

    @property
    def wants_steps(self) -> bool:
        return any(b.wants_steps for b in self.optional)

    def step_logger(self, epoch: int, steps_per_epoch: int, start_step: int):
        """The `on_log(steps_done, values)` of this epoch's progress line, or None if no backend wants steps."""
        return partial(self.step, (epoch - 1) * steps_per_epoch + start_step) if self.wants_steps else None

    def step(self, offset: int, steps_done: int, values: dict) -> None:
        row = {"global_step": offset + steps_done, "step/loss": values.get("loss"), "step/lr": values.get("lr"),
               "step/img_s": values.get("img_s")}
        self._each("step", row)

    def epoch(self, row: dict) -> None:
        """One epoch's row to every backend."""
        if self.jsonl is not None:
            self.jsonl.epoch(row)  # raises: as a checkpoint that cannot be written, the run stops
        self._each("epoch", row)

    def announce(self, row: dict, best: float) -> None:
        """The epoch's console line, once its checkpoint is written: the line means the epoch is kept."""
        if self.show:
            Progress.line(console_line(row, best, self.eval_every))

    def close(self, exit_code: int = 0) -> None:
        """Close every backend; `exit_code` 1: the run raised (W&B marks it failed)."""
        self._each("close", exit_code)
        self.optional = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:  # closed however the run ends; one that raised, as failed
        self.close(exit_code=0 if exc_type is None else 1)

    def _each(self, method, *args) -> None:
        for b in list(self.optional):
            if method == "step" and not b.wants_steps:
                continue
            try:
                getattr(b, method)(*args)
            except Exception as e:
                self.optional.remove(b)
                self._warn(b.name, method, e)

    @staticmethod
    def _warn(name, when, e) -> None:  # one line on stderr, around the progress bar
        Progress.line(f"warning: {name} logging failed at {when} ({one_line(e, None, first_line=True)}); it is off for "
                      "the rest of this run, metrics.jsonl and the checkpoints go on")


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def console_line(row: dict, best: float, eval_every: int) -> str:
    """The epoch's summary line, as printed under the progress bar."""
    evaluated = row["val_top1"] is not None
    top5 = "" if row.get("val_top5") is None else f" top-5 {row['val_top5']:.2f}%"
    of_ema = f", EMA {row['val_top1_ema']:.2f}%" if evaluated and row.get("val_top1_ema") is not None else ""
    scores = (f"val top-1 {row['val_top1']:.2f}%{top5}{of_ema} (best {best:.2f}%)" if evaluated
              else f"not evaluated (--eval-every {eval_every})")
    return (f"epoch {row['epoch']}: train loss {_fmt(row['train_loss'])} top-1 {row['train_top1']:.1f}% | "
            f"{scores} | {row['img_s']:.0f} img/s")
