"""What the data path raises: a batch that does not decode, a package that is not installed, and the
one-line form every message takes."""
from __future__ import annotations


class MissingPackage(ImportError):
    """A package that the asked-for path needs is not installed; the message says what to install."""


def dali_wheel() -> str:
    """The DALI wheel for this torch: nvidia-dali-cudaXY0 for torch's CUDA major (CUDA 13 for a CPU torch,
    whose DALI runs CPU-only with any build)."""
    import torch
    major = (torch.version.cuda or "13").split(".")[0]
    return f"nvidia-dali-cuda{major}0"


def missing_dali(error: ImportError) -> MissingPackage:
    """The MissingPackage for a failed DALI import: which wheel to install, or --loader torch."""
    import torch
    cuda = f"this torch's CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU torch (CPU-only mode)"
    return MissingPackage(f"--loader dali: NVIDIA DALI is not installed ({error.name or error}); "
                          f"`pip install {dali_wheel()}` (the build for {cuda}), or pass --loader torch")


class DecodeError(RuntimeError):
    """An image of one batch could not be read or decoded.

    Attributes:
        epoch: the 0-based epoch; step: the batch's index in it.
        files: every file of the batch, in batch order (absolute when the root was).
        bad_files: the files known to fail: each one for the torchvision loader; for DALI,
            which fails the whole batch, the one its message names, if any (it names a file
            whose data is corrupt, not one whose headers are), else empty: "one of".
        reason: the decoder's error, one line.
    """

    def __init__(self, epoch: int, step: int, files, bad_files=(), reason: str = ""):
        self.epoch, self.step = epoch, step
        self.files, self.bad_files, self.reason = list(files), list(bad_files), reason
        where = f"epoch {epoch}, batch {step}"
        why = f" ({reason})" if reason else ""
        if self.bad_files:
            message = (f"cannot decode {', '.join(self.bad_files)}{why} in {where}; "
                       f"the batch's {len(self.files)} files: {', '.join(self.files)}")
        else:
            message = (f"cannot decode one of the {len(self.files)} files of {where}{why}: "
                       f"{', '.join(self.files)}")
        super().__init__(" ".join(message.splitlines()))  # one line, whatever the paths hold

    def __reduce__(self):  # the default would call DecodeError(message) (DDP, multiprocessing)
        return type(self), (self.epoch, self.step, self.files, self.bad_files, self.reason)


def one_line(error: BaseException, limit: int | None = 300, *, typed: bool = True, ellipsis: bool = True,
             first_line: bool = False) -> str:
    """``"Type: message"`` of an exception on one line, cut to ``limit`` characters.

    typed=False: the message alone. limit=None: never cut; ellipsis=False: cut bare, without "...".
    first_line: the message's first line that is not blank, stripped (its type's name when none), for torch's
    multi-line reasons, which say it there; otherwise every run of whitespace becomes one space.
    """
    message = str(error)
    if first_line:
        text = next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)
        text = f"{type(error).__name__}: {text}" if typed else text
    else:
        text = " ".join((f"{type(error).__name__}: {message}" if typed else message).split())
    if limit is None or len(text) <= limit:
        return text
    return text[:limit - 3] + "..." if ellipsis else text[:limit]
