"""A command's output never replaces its own input or a run's files: each --out is checked here first.

Checked before any work, so a refusal leaves everything as it was (the export's temporary file, the
plot's matplotlib import and the show's loader never start).
"""
import tempfile
from pathlib import Path

from rmix.rundir import RUN_FILES, holds_run

RUN_OWNED = RUN_FILES + ("changes.jsonl",)  # what a run directory's own files are called


def check_out(out, *, inputs=(), option="--out", directory=False) -> Path:
    """`out` as a Path, or ValueError (one line naming it) when writing there would replace what matters.

    Refused: the same file as one of `inputs` (by any path or link), a file inside an input that is a
    directory (a data set), a run's own file (`RUN_OWNED` in a directory that holds a run, existing
    or not: the run writes it next), and a directory where a file is written (a file where a
    directory is, with `directory`).
    """
    out = Path(out).expanduser()
    for src in inputs:
        src = Path(src).expanduser()
        if _same(out, src):
            raise ValueError(f"{option}: {out} is an input of this command; write the output elsewhere")
        if src.is_dir() and _inside(out, src):
            raise ValueError(f"{option}: {out} is inside {src}, an input of this command; write the output elsewhere")
    if directory:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{option}: {out} is a file, not a directory")
        return out
    if out.is_dir():
        raise ValueError(f"{option}: {out} is a directory; give a file name")
    if out.name in RUN_OWNED and out.parent.is_dir() and holds_run(out.parent):
        raise ValueError(f"{option}: {out} is a file of the run in {out.parent}; write the output elsewhere")
    _writable(out.parent, out, option)
    return out


def _writable(folder: Path, out: Path, option: str) -> None:
    """ValueError naming `out` where nothing can be written: its nearest existing folder refuses a file
    (read-only, another owner's, or /proc), or what should be a folder on the way is a file."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{option}: cannot write {out}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{option}: cannot write {out}: {folder} takes no new file ({e.strerror})") from None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents
