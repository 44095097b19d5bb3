"""Training curves of one or more run directories, overlaid: a 2x2 PNG from their metrics.jsonl."""
import json
from pathlib import Path

WIDTH_IN, HEIGHT_IN, DPI = 10.0, 7.5, 100  # the PNG is 1000 x 750 pixels


def load_run(run_dir) -> tuple[str, list[dict]]:
    """(label, rows) of a run directory: label is `<dir name> (<mix.policy>)`, rows one per epoch.

    A resumed run can log an epoch twice (killed between the log line and the checkpoint); the
    last row of each epoch wins.
    """
    d = Path(run_dir).expanduser()
    path = d / "metrics.jsonl"
    if not d.is_dir():
        raise ValueError(f"{d}: no such run directory")
    if not path.is_file():
        raise ValueError(f"{d}: no metrics.jsonl (not a run directory, or no epoch has finished yet)")
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows[int(row["epoch"])] = row
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a metrics row ({e})") from None
    if not rows:
        raise ValueError(f"{path}: holds no epochs yet")
    label = d.resolve().name
    try:
        policy = json.loads((d / "config.json").read_text())["mix"]["policy"]
        label = f"{label} ({policy})"
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or old config: the directory name alone
    return label, [rows[e] for e in sorted(rows)]


def _series(rows, key):
    pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(run_dirs, out="curves.png", title=None) -> Path:
    """Draw train loss, top-1 (train dashed, val solid), val top-5 (or val loss) and lr against epoch."""
    if not run_dirs:
        raise ValueError("rmix plot: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]  # check every directory before importing matplotlib
    names = [label for label, _ in runs]
    runs = [(str(d) + label[len(Path(d).expanduser().resolve().name):] if names.count(label) > 1 else label, rows)
            for d, (label, rows) in zip(run_dirs, runs)]  # two runs named alike: label by the path given
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("rmix plot needs matplotlib: pip install 'rmix[plot]'") from None
    # Figure + FigureCanvasAgg, not pyplot: no global backend state, no display needed.
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(fig)
    (loss_ax, top1_ax), (third_ax, lr_ax) = fig.subplots(2, 2, sharex=True)
    third = "val_top5" if any(r.get("val_top5") is not None for _, rows in runs for r in rows) else "val_loss"
    for i, (label, rows) in enumerate(runs):
        color = f"C{i % 10}"
        style = {"marker": "o", "markersize": 4} if len(rows) == 1 else {}  # one epoch: a point, not a line
        loss_ax.plot(*_series(rows, "train_loss"), color=color, label=label, **style)
        top1_ax.plot(*_series(rows, "train_top1"), color=color, linestyle="--", **style)
        top1_ax.plot(*_series(rows, "val_top1"), color=color, **style)
        third_ax.plot(*_series(rows, third), color=color, **style)
        lr_ax.plot(*_series(rows, "lr"), color=color, **style)
    for ax, name in ((loss_ax, "train loss"), (top1_ax, "top-1 % (train dashed, val solid)"),
                     (third_ax, "val top-5 %" if third == "val_top5" else "val loss"), (lr_ax, "learning rate")):
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in (third_ax, lr_ax):
        ax.set_xlabel("epoch")
    loss_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays 1000 x 750
    return out
