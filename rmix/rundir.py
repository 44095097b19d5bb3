"""A run directory belongs to one run: refused when it holds another, locked while a run lives in it.

The lock is a POSIX record lock (lockf) on RUN/.lock held by rank 0 for the run's whole life: the
kernel drops it when the process dies, however it dies, so a lock left by a killed run never
blocks a resume. Not flock: an flock is shared with forked children (DataLoader workers), which
can outlive a killed trainer for a while and would keep the directory locked.
"""
import fcntl
import os
import shutil
from pathlib import Path

RUN_FILES = ("config.json", "metrics.jsonl", "latest.pt", "best.pt")  # any of these: a run lives here
LOCK = ".lock"


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def claim(run_dir: Path, *, resume: bool, resume_from: str = ""):
    """Check --out, create it, and lock it; returns a `Claim` (release() it at the end).

    Raises ValueError (one line, naming the directory) when it is a file, cannot be created or
    written, already holds a run and `resume` is false or `resume_from` is a checkpoint of another
    directory (that run's files would be overwritten), or another process holds its lock.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out: {run_dir} is a file, not a directory")
    if not resume and run_dir.is_dir() and holds_run(run_dir):
        raise ValueError(f"--out: {run_dir} already holds a run; `--resume auto` continues it, "
                         "a new --out starts afresh")
    if resume_from not in ("", "auto") and run_dir.is_dir() and holds_run(run_dir) \
            and Path(resume_from).resolve().parent != run_dir.resolve():
        raise ValueError(f"--out: {run_dir} already holds a run, and --resume {resume_from} is another "
                         "directory's checkpoint; `--resume auto` continues the run there, a new --out "
                         "continues the checkpoint")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out: cannot create {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out: {run_dir} is not writable")
    try:
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise ValueError(f"--out: cannot write in {run_dir}: {e.strerror}") from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise ValueError(f"--out: {run_dir} is in use by another rmix run (pid {holder}); "
                         "wait for it to end or choose another --out") from None
    # a save killed mid-write leaves its temporary (checkpoint.save's .tmp-*.pt); with the lock held no
    # living run writes here, so it is nobody's: removed, it neither reads as a result nor fills the disk
    for tmp in run_dir.glob(".tmp-*.pt"):
        tmp.unlink(missing_ok=True)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return Claim(run_dir, f, created)


class Claim:
    """A held run directory; `release(failed=True)` also removes it when this run created it and it holds no results."""

    def __init__(self, run_dir: Path, lock_file, created: bool):
        self.run_dir, self._file, self._created = run_dir, lock_file, created

    def release(self, failed: bool = False):
        self._file.close()
        if failed and self._created and not _has_results(self.run_dir):
            # this run made the directory and failed before its first metrics row or checkpoint:
            # what it holds (config.json, tb/, the lock) describes a run that never happened
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _has_results(run_dir: Path) -> bool:
    """Whether `run_dir` holds a metrics row or a checkpoint (mid-epoch saves included)."""
    return (run_dir / "metrics.jsonl").exists() or any(run_dir.glob("*.pt"))
