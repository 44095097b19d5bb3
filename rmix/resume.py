"""Resume means the same run: a saved config, the options given now, and which changes are allowed.

A resumed run starts from the config its checkpoint saved. A setting given again with the value it
had changes nothing; one given with another value is refused, unless `--allow-changes` names it
(then it is recorded in RUN/changes.jsonl, and config.json keeps the original). Where the data
lives, the loader's threads, logging, the device and the run's own paths may differ freely.
`resolve` finds the checkpoint a run goes on from, and the config it goes on with.
"""
import json
from pathlib import Path

from rmix import checkpoint, rundir
from rmix import config as C
from rmix.logs import metrics_rows
from rmix.pipelines.errors import one_line
from rmix.progress import Progress

# May differ on resume: where things are and how fast they run, not what is trained.
RUNTIME = ("out", "resume", "device", "compile", "deterministic", "log_every", "log", "dist_timeout", "data.workers", "data.preflight",
           "data.data_dir", "data.dali_device", "data.torch_decode", "max_skipped_steps")
# Never, even when allowed: the optimizer's state or the weights would no longer fit, or come from elsewhere.
NEVER = ("model", "num_classes", "mix.policy", "mix.share_fc", "optim.optimizer", "data.dataset", "init_from",
         "init_from_sha256", "pretrained", "pretrained_file")


get = C.get


def merge(cfg, saved, path, *, given=None, allow=()):
    """(the config to continue with, {field: [saved, new]} accepted); ValueError lists every refused change.

    `given`: the dotted fields set by the user this time (None: every field of `cfg`); `allow`: the
    dotted fields that may change.
    """
    types = C.field_types()
    allow = set(allow)
    given = set(types) if given is None else set(given)
    changes, refused = {}, []
    merged = saved
    for key in sorted(types):
        now = get(cfg, key)
        if key in RUNTIME:  # the saved one unless given now (a resume without --data-dir reads the run's data)
            if key in given or key in ("out", "resume"):
                merged = C.replace(merged, **{key: now})
            continue
        if key not in given or key == "num_classes":
            continue
        was = get(saved, key)
        if now == was or (key in ("data.mean", "data.std") and not now):  # () = the dataset's own, resolved
            continue
        if key in NEVER or key not in allow:
            refused.append((key, was, now))
        else:
            changes[key] = [was, now]
            merged = C.replace(merged, **{key: now})
    if refused:
        listed = "; ".join(f"{k}: saved {was!r}, now {now!r}" for k, was, now in refused)
        never = [k for k, _, _ in refused if k in NEVER]
        how = (f"{', '.join(never)} cannot change in a run: start a new --out" if never else
               f"--allow-changes {','.join(k for k, _, _ in refused)} continues with them, recorded")
        raise ValueError(f"--resume: {path} is another run's state ({listed}); {how}")
    return merged, changes


def record(run_dir: Path, epoch: int, step: int, changes: dict):
    """Append the accepted changes to RUN/changes.jsonl."""
    if changes:
        with open(Path(run_dir) / "changes.jsonl", "a") as f:
            f.write(json.dumps({"from_epoch": epoch, "step": step, "changes": changes}) + "\n")


def config_json_differs(run_dir: Path, saved: dict, path) -> str | None:
    """A line saying how RUN/config.json (with changes.jsonl's changes applied) differs from the
    settings `saved` in checkpoint `path`, which the run goes on with; None where they agree."""
    config = Path(run_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        cfg = C.from_dict(json.loads(config.read_text()))
        log = Path(run_dir) / "changes.jsonl"
        for line in (log.read_text().splitlines() if log.is_file() else []):
            cfg = C.replace(cfg, **{k: now for k, (_, now) in json.loads(line)["changes"].items()})
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        why = one_line(e, 120, typed=False, ellipsis=False)
        return (f"{config}: not this run's settings as rmix wrote them ({why}); the run goes on with {path}'s, "
                "and config.json stays as it is")
    ckpt = C.from_dict(saved)
    for key in sorted(C.field_types()):
        if key not in RUNTIME and get(cfg, key) != get(ckpt, key):
            return (f"{config}: {key} is {get(cfg, key)!r} there, {get(ckpt, key)!r} in {path}; the run goes on "
                    "with the checkpoint's, and config.json stays as it is")
    return None


def resolve(cfg, run_dir, *, given=None, allow=()):
    """What `cfg.resume` asks of a run in `run_dir`: (the config to run, the checkpoint to go on from or
    None, its path, the changes `allow` let in).

    A resume goes on with the checkpoint's config merged with the options given now (`merge`);
    `--resume auto` with no latest.pt starts afresh where that loses nothing (`_fresh_start`), from
    --init-from's weights where given; a checkpoint's run takes no --init-from but its own (`_own_weights`)."""
    if not cfg.resume:
        return cfg, None, None, {}
    path = run_dir / "latest.pt" if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not path.is_file():  # nothing to continue from
        return _fresh_start(cfg, run_dir, given, allow), None, None, {}
    try:
        ckpt = checkpoint.read(path)
    except checkpoint.CheckpointError as e:  # a latest.pt cut short: say what is left to go on from
        best = path.with_name("best.pt")
        if path.name != "latest.pt" or not best.is_file():
            raise
        raise checkpoint.CheckpointError(f"{e}; `--resume {best}` continues from best.pt's epoch") from None
    if ckpt["foreign"]:
        raise checkpoint.CheckpointError(f"{path}: not an rmix training checkpoint (cannot resume from it)")
    saved = C.from_dict(ckpt["config"])
    _own_weights(cfg, saved, path, given)
    cfg, changes = merge(cfg, saved, path, given=given, allow=allow)
    metrics_rows(run_dir / "metrics.jsonl")  # a bad row is refused before anything is written
    return cfg, ckpt, path, changes


def _own_weights(cfg, saved, path, given):
    """--init-from on a resume: the checkpoint holds the run's weights, and the run goes on from them.

    The run's own --init-from given again (the same command relaunched with `--resume auto`) changes
    nothing and loads nothing; any other is refused."""
    if cfg.init_from and cfg.init_from != saved.init_from and (given is None or "init_from" in given):
        was = f"started from --init-from {saved.init_from}" if saved.init_from else "started from random weights"
        raise ValueError(f"--init-from: a --resume goes on from the run's own weights in {path} ({was}), not "
                         f"{cfg.init_from}'s; drop --init-from to resume, or start a new run from it in a new --out")


def _fresh_start(cfg, run_dir, given, allow):
    """`--resume auto` where no latest.pt is: the run starts at epoch 1 if nothing of a run would be lost.

    A directory with results (metrics rows, best.pt, a checkpoint) but no latest.pt is refused: a
    fresh start would trim its metrics and overwrite its best.pt. One with only the config.json of
    a run that died before its first checkpoint (and at most epoch 1's row, written just before it)
    starts that run again, with that config: options given now must agree with it (or be allowed),
    as on any resume.
    """
    there = [name for name in rundir.RUN_FILES if (run_dir / name).exists()]
    there += sorted(p.name for p in run_dir.glob("*.pt") if p.name not in there)
    rows = metrics_rows(run_dir / "metrics.jsonl")
    # epoch 1's row is written just before its latest.pt: a kill between the two leaves that row alone,
    # which a resume from latest.pt would trim too. A second row, or any .pt, means a checkpoint was there.
    first_save_lost = there == ["config.json", "metrics.jsonl"] and len(rows) <= 1
    if any(name != "config.json" for name in there) and not first_save_lost:
        best = run_dir / "best.pt"
        hint = f"`--resume {best}` continues from best.pt's epoch, " if best.is_file() else ""
        raise ValueError(f"--resume auto: {run_dir} holds a run ({', '.join(there)}) but no latest.pt to continue "
                         f"from; {hint}a new --out starts afresh")
    if there:  # config.json (and epoch 1's row, to be trimmed): the same run, from its start
        saved = C.from_dict(json.loads((run_dir / "config.json").read_text()))
        cfg, _ = merge(cfg, saved, run_dir / "config.json", given=given, allow=allow)
    return cfg


def say_what_it_lacks(run_dir, path, ckpt):
    """Rows of the epochs latest.pt covers that metrics.jsonl lacks, and a best.pt left elsewhere: said once."""
    have = {json.loads(line)["epoch"] for line in metrics_rows(run_dir / "metrics.jsonl")}
    missing = [e for e in range(1, ckpt["epoch"] + 1) if e not in have]
    elsewhere = Path(path).resolve().parent != run_dir.resolve()
    if missing and elsewhere:
        best = f" (best val top-1 {ckpt['best_top1']:.2f}%)" if ckpt.get("best_top1", -1) >= 0 else ""
        Progress.line(f"--resume {path}: epochs 1-{ckpt['epoch']} were trained into {Path(path).parent}; their "
                      f"metrics rows and best.pt stay there{best}, and this run writes its own best.pt when an "
                      "epoch beats that")
    elif missing:
        shown = ",".join(map(str, missing[:8])) + (",..." if len(missing) > 8 else "")
        Progress.line(f"{run_dir / 'metrics.jsonl'}: no rows for epochs {shown}, which latest.pt covers; they stay "
                      "missing (the run goes on from latest.pt)")
