"""Resume means the same run: a saved config, the options given now, and which changes are allowed.

A resumed run starts from the config its checkpoint saved. A setting given again with the value it
had changes nothing; one given with another value is refused, unless `--allow-changes` names it
(then it is recorded in RUN/changes.jsonl, and config.json keeps the original). Where the data
lives, the loader's threads, logging, the device and the run's own paths may differ freely.
"""
import json
from pathlib import Path

from rmix import config as C

# May differ on resume: where things are and how fast they run, not what is trained.
RUNTIME = ("out", "resume", "device", "compile", "deterministic", "log_every", "log", "dist_timeout", "data.workers", "data.preflight",
           "data.data_dir", "data.dali_device", "data.torch_decode", "max_skipped_steps")
# Never, even when allowed: the optimizer's state or the weights would no longer fit.
NEVER = ("model", "num_classes", "mix.policy", "mix.share_fc", "optim.optimizer", "data.dataset")


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
        why = " ".join(str(e).split())[:120]
        return (f"{config}: not this run's settings as rmix wrote them ({why}); the run goes on with {path}'s, "
                "and config.json stays as it is")
    ckpt = C.from_dict(saved)
    for key in sorted(C.field_types()):
        if key not in RUNTIME and get(cfg, key) != get(ckpt, key):
            return (f"{config}: {key} is {get(cfg, key)!r} there, {get(ckpt, key)!r} in {path}; the run goes on "
                    "with the checkpoint's, and config.json stays as it is")
    return None
