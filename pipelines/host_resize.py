"""The CPU train pipeline's last stage: DALI's ragged crops -> uint8 (N, size, size, 3), on a thread.

Why not DALI's own resize: on the CPU it costs as much as the ROI decode, while torch's uint8
antialiased bilinear kernel on a channels-last view does the same resize in a fraction of that
(BENCHMARKS.md, "Where the time goes"), and its antialiasing is made to match PIL's (the
torchvision loader's). So on the CPU the DALI graph stops after the crop (and colour), and one
thread resizes and flips each batch while DALI's threads decode the next ones. The flip comes
after the resize, on the smaller image: the resize is mirror-symmetric, so the order does not
matter.

That thread runs torch with one intra-op thread: with more it shares the cores with DALI's threads
through OpenMP's spinning teams, which slows the whole loader (BENCHMARKS.md). torch's thread count is
per OS thread, but `torch.set_num_threads` also stores the count new threads start with (and
MKL's), so the caller sets it back right after.
"""
from __future__ import annotations

import atexit
import queue
import threading

import numpy as np
import torch

_END = object()
_RUNNING: dict[threading.Thread, threading.Event] = {}  # live threads and their stop flags


@atexit.register
def _stop_all():
    """Stop every resize thread before the interpreter exits: a daemon thread still inside DALI
    while its globals are torn down aborts the process ("terminate called without an active
    exception"; 4 exits in 20 with an epoch left half-way)."""
    for stop in list(_RUNNING.values()):
        stop.set()
    for thread in list(_RUNNING):
        thread.join()


def resize_crops(crops, size: int, flips=None, pin_memory: bool = False) -> torch.Tensor:
    """HWC uint8 images of any sizes -> uint8 (N, size, size, 3): bilinear, antialiased when shrinking.

    ``flips``: per image, whether to mirror it left-right (after the resize); None: none.
    ``pin_memory``: page-locked output, for an asynchronous copy to a GPU.
    """
    out = torch.empty(len(crops), size, size, 3, dtype=torch.uint8, pin_memory=pin_memory)
    for i in range(len(crops)):
        # NCHW views of HWC memory are channels-last, the layout of torch's fast uint8 kernel, so
        # it reads the crop and writes out[i] in place (F.interpolate has no out=; a copy costs
        # more, BENCHMARKS.md). The crop is (1, H, W, 3) permuted: permuting first and unsqueezing
        # after gives N a stride torch does not read as channels-last (its slow kernel).
        crop = torch.from_numpy(np.asarray(crops[i]))[None].permute(0, 3, 1, 2)
        torch.ops.aten._upsample_bilinear2d_aa.out(crop, [size, size], False, None, None,
                                                   out=out[i:i + 1].permute(0, 3, 1, 2))
        if flips is not None and flips[i]:
            out[i] = out[i].flip(1)
    return out


class HostResize:
    """Iterates one epoch of a built DALI pipeline (outputs: ragged HWC crops, int32 labels, flips).

    Yields what DALIGenericIterator yields, ``[{"images": uint8 (N, size, size, 3), "labels": (N, 1)}]``,
    for exactly ``num_batches`` batches; the last one holds its first ``last_size`` samples (the
    reader pads a short last batch by repeating its last sample), or all when it is None. The pipeline is scheduled no further than that, so an
    epoch does not decode batches of the next one that a rebuilt pipeline would throw away.
    `start(skip)` launches the thread; the first `skip` batches are decoded but not resized and
    come out as None. A pipeline error is raised by `next` as DALI raised it. `close()` stops the
    thread (after the batch DALI is working on), before the pipeline may be shut down.
    """

    def __init__(self, pipe, num_batches: int, size: int, depth: int = 2, pin_memory: bool = False,
                 last_size: int | None = None):
        self._pipe, self._num_batches, self._size, self._pin = pipe, num_batches, size, pin_memory
        self._last = last_size  # samples of the last batch that are real (the reader pads it); None: all
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return self._num_batches

    def start(self, skip: int = 0):
        if self._thread is not None:
            raise RuntimeError("HostResize.start: already started")
        ready = threading.Event()
        threads = torch.get_num_threads()
        # The thread holds the pipeline, queue and flag, not self: a HostResize dropped mid-epoch
        # (its loader garbage) stops the thread from __del__ and the pipeline can be freed.
        self._thread = threading.Thread(
            target=_produce, args=(self._pipe, self._num_batches, self._size, self._pin, skip, self._last,
                                   self._queue, self._stop, ready), daemon=True, name="rmix-host-resize")
        _RUNNING[self._thread] = self._stop
        self._thread.start()
        ready.wait()
        torch.set_num_threads(threads)  # this thread's count again, and the default of new ones

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            self.start()
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self._queue.put(item)  # stays exhausted, or failed
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self):
        """Stop the thread and wait for it (at most until DALI finishes the batch in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __del__(self):
        self._stop.set()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _produce(pipe, n: int, size: int, pin_memory: bool, skip: int, last: int | None, q: queue.Queue,
             stop: threading.Event, ready: threading.Event):
    torch.get_num_threads()  # torch's lazy per-thread setup first: later it would take the default
    torch.set_num_threads(1)
    ready.set()
    try:
        scheduled = 0
        for step in range(n):
            if stop.is_set():
                return
            if step == 0:
                pipe.schedule_run()  # the first call fills the prefetch queue
                scheduled = min(n, pipe.prefetch_queue_depth)
            elif scheduled < n:
                pipe.schedule_run()
                scheduled += 1
            images, labels, flips = pipe.outputs()
            item = None
            if step >= skip:
                keep = last if step == n - 1 and last is not None else len(images)  # drop the reader's padding
                flips = np.array(flips.as_tensor()).reshape(-1)[:keep]
                item = [{"images": resize_crops([images[i] for i in range(keep)], size, flips, pin_memory),
                         "labels": torch.from_numpy(np.array(labels.as_tensor())[:keep])}]
            if not _put(q, stop, item):
                return
        _put(q, stop, _END)
    except BaseException as error:  # noqa: B036 - handed to the consumer, raised there
        _put(q, stop, error)
    finally:
        _RUNNING.pop(threading.current_thread(), None)
