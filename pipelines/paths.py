"""Where rmix keeps what it can regenerate: the embedded dataset, preflight results, bench files."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache: $RMIX_CACHE, else $XDG_CACHE_HOME/rmix, else ~/.cache/rmix."""
    if os.environ.get("RMIX_CACHE"):
        return Path(os.environ["RMIX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rmix"
