"""Device work torch's stream does not order by itself, checked with CUDA mocked: the decoders' outputs
(pipelines.streams.ordered_decode) and DALI's zero-copy batches (pipelines.streams.BatchHold)."""
import contextlib
import gc
import weakref

import pytest
import torch

from rmix.pipelines import streams


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")

    def __repr__(self):
        return self.name


class FakeImage:
    def __init__(self, log):
        self.log = log

    def record_stream(self, stream):
        self.log.append(f"record_stream {stream.name}")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's streams as a log: the current stream, a side stream, `torch.cuda.stream(s)`."""
    log = []
    main = FakeStream("main", log)
    state = {"current": main}

    @contextlib.contextmanager
    def stream(s):
        before, state["current"] = state["current"], s
        log.append(f"enter {s.name}")
        try:
            yield
        finally:
            state["current"] = before
            log.append(f"exit {s.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(streams, "_SIDE_STREAMS", {})
    return log, state


def test_a_device_decode_runs_on_a_side_stream_that_torch_waits_for(fake_cuda):
    import torch.utils.deterministic as det
    log, state = fake_cuda
    before = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = True  # as under --deterministic

    def decode(data):
        # inside: the side stream is current, and torch fills nothing it allocates
        log.append(f"decode on {state['current'].name}, fill {det.fill_uninitialized_memory}")
        return [FakeImage(log) for _ in data]

    try:
        images = streams.ordered_decode(decode, [b"a", b"b"], torch.device("cuda", 0))
        assert det.fill_uninitialized_memory is True  # restored
    finally:
        det.fill_uninitialized_memory = before
    assert len(images) == 2
    assert log == ["enter side", "decode on side, fill False", "exit side", "main waits for side",
                   "record_stream main", "record_stream main"]
    assert state["current"].name == "main"


def test_the_fill_setting_is_restored_when_the_decoder_raises(fake_cuda):
    import torch.utils.deterministic as det
    before = det.fill_uninitialized_memory

    def fails(data):
        raise RuntimeError("nvjpeg: bad data")

    with pytest.raises(RuntimeError, match="bad data"):
        streams.ordered_decode(fails, [b"x"], torch.device("cuda", 0))
    assert det.fill_uninitialized_memory is before and fake_cuda[1]["current"].name == "main"


def test_off_cuda_the_decode_is_called_as_it_is():
    log = []
    assert streams.ordered_decode(lambda d: log.append(d) or ["img"], [b"a"], torch.device("cpu")) == ["img"]
    assert log == [[b"a"]]


class FakeEvent:
    """A CUDA event whose completion the test decides."""
    made = []

    def __init__(self):
        self.done = False
        self.recorded_on = None
        self.waited = False
        FakeEvent.made.append(self)

    def record(self, stream):
        self.recorded_on = stream

    def query(self):
        return self.done

    def synchronize(self):
        self.waited = True
        self.done = True


@pytest.fixture
def fake_events(monkeypatch, fake_cuda):
    FakeEvent.made = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    return FakeEvent.made


def test_a_held_batch_lives_until_torchs_stream_has_passed_its_event(fake_events):
    hold = streams.BatchHold(torch.device("cuda", 0))
    first = torch.zeros(3)
    alive = weakref.ref(first)
    hold.hold(first)
    del first
    gc.collect()
    assert alive() is not None and len(hold) == 1
    assert fake_events[0].recorded_on.name == "main"  # recorded on torch's current stream
    hold.hold(torch.ones(3))  # the event has not completed: both kept
    gc.collect()
    assert alive() is not None and len(hold) == 2
    fake_events[0].done = True
    hold.hold(torch.ones(3))  # the next call drops what the stream has passed, and only that
    gc.collect()
    assert alive() is None and len(hold) == 2
    hold.release()  # the close waits for the last event
    assert fake_events[-1].waited and len(hold) == 0


def test_a_hold_off_cuda_keeps_nothing():
    hold = streams.BatchHold(torch.device("cpu"))
    x = torch.zeros(2)
    alive = weakref.ref(x)
    hold.hold(x)
    del x
    gc.collect()
    assert alive() is None and len(hold) == 0


def test_the_torch_loaders_device_decode_goes_through_the_ordering(jpeg_folder_4x6, monkeypatch):
    # every call of the device decoder, the batch's and a refused file's own, is ordered
    from helpers import loader_of
    from rmix.pipelines import scan_image_folder, torch_loader
    calls, real = [], torch_loader.ordered_decode

    def spy(decode, data, device):
        calls.append(len(data))
        return real(decode, data, device)

    monkeypatch.setattr(torch_loader, "ordered_decode", spy)
    kw = dict(train=True, batch_size=8, crop_size=16, val_resize=20, workers=0, torch_decode="device")
    assert len(list(loader_of("torch", scan_image_folder(jpeg_folder_4x6 / "train"), **kw))) == 3
    assert calls == [8, 8, 8]
    calls.clear()

    def refuses_batches(self, data):  # as nvJPEG refusing one file of a batch
        if len(data) > 1:
            raise RuntimeError("refused")
        return [torch.zeros(3, 5, 5, dtype=torch.uint8)]

    monkeypatch.setattr(torch_loader.DeviceDecode, "_jpegs", refuses_batches)
    assert len(list(loader_of("torch", scan_image_folder(jpeg_folder_4x6 / "train"), **kw))) == 3
    assert calls == [8, *[1] * 8] * 3  # the batch, then each file alone


def test_each_dali_batch_is_held_once_the_next_is_asked_for(jpeg_folder_4x6, monkeypatch):
    # the loader hands every batch it yielded to its hold, after the consumer asked for the next one
    from helpers import loader_of
    from rmix.pipelines import dali, scan_image_folder
    held = []

    class Spy(streams.BatchHold):
        def hold(self, *tensors):
            held.append(tensors)
            super().hold(*tensors)

    monkeypatch.setattr(dali, "BatchHold", Spy)
    loader = loader_of("dali", scan_image_folder(jpeg_folder_4x6 / "val"), train=False, batch_size=4, crop_size=16,
                       val_resize=20, workers=1, dali_device="cpu")
    seen = []
    for images, _ in loader:
        assert len(held) == len(seen)  # not before the consumer is done with it
        seen.append(images)
    assert len(held) == len(seen) == 3
    assert all(h[0] is s for h, s in zip(held, seen))
