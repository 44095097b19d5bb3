"""Device work that torch's stream does not order by itself: decoders with streams of their own, and
batches whose memory torch does not own. Both are no-ops off CUDA.

torch orders its own kernels on its current stream, and its caching allocator reuses a block only
in that stream's order (or, after `record_stream`, once the recorded streams have passed it). Two
things on rmix's data path step outside that:

- torchvision's CUDA `decode_jpeg` allocates its outputs on the caller's stream but decodes on a
  stream of its own, which never waits for the caller's; it only makes the caller wait afterwards
  (torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp). So memory that the caller's stream still
  reads can be written by nvJPEG, and under `--deterministic` torch's fill of every new tensor
  (queued on the caller's stream) can land after the decode: white images. `ordered_decode` runs
  the call on a side stream that holds only decode outputs, each released to torch's stream with
  `record_stream`, with the fill turned off around the call.
- DALI hands its GPU batches to torch zero-copy (DLPack). DALI 2.4 itself frees such memory only
  after a `cudaDeviceSynchronize` on a thread of its own (nvidia/dali DLTensorGraveyard), which is
  DALI's internal detail, not its contract; `BatchHold` keeps each batch referenced until torch's
  stream has passed an event recorded after the batch's last use, whatever DALI's version does.
"""
from __future__ import annotations

import collections
import contextlib

import torch

_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device):
    """One stream per CUDA device for decoders' outputs (created once, reused)."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


@contextlib.contextmanager
def no_deterministic_fill():
    """`torch.empty` leaves memory as it is inside: a fill queued on one stream would race a decoder
    that writes from another (`use_deterministic_algorithms` fills new tensors otherwise)."""
    import torch.utils.deterministic as det
    saved = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = saved


def ordered_decode(decode, data, device: torch.device):
    """`decode(data)` -> list of tensors on `device`, ordered with torch's current stream.

    On CUDA: the decoder allocates on a side stream that runs no kernels, so no block it gets can
    still be read by queued work (blocks come back to it only through `record_stream`, once torch's
    stream has passed them); the deterministic fill is off, so nothing but the decoder writes them;
    torch's stream then waits for the side stream (which the decoder made wait for its own), and
    each output is recorded on torch's stream before it is used there. Elsewhere: `decode(data)`.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return decode(data)
    current = torch.cuda.current_stream(device)
    side = side_stream(device)
    with no_deterministic_fill(), torch.cuda.stream(side):
        images = decode(data)
    current.wait_stream(side)
    for image in images:
        image.record_stream(current)
    return images


class BatchHold:
    """Keeps batches that torch does not own (DALI's zero-copy outputs) referenced until torch's
    stream has passed an event recorded after their last use.

    `hold(*tensors)` when the consumer asks for the next batch: every kernel that reads the previous
    one is queued by then. Entries whose event has completed are dropped at each call (a query, not
    a wait). `release()` waits for the last event and drops everything (the loader's close).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._held = collections.deque()  # (event, tensors), oldest first

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, *tensors):
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._held.append((event, tensors))
        while self._held and self._held[0][0].query():
            self._held.popleft()

    def release(self):
        if self._held:
            self._held[-1][0].synchronize()  # note: a CPU-GPU sync point, at the loader's close only
        self._held.clear()
