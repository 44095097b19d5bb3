"""What the benchmarks share: step timers (CUDA events on a GPU), medians, and the machine's description.

Every `rmix bench` figure is a median over repetitions after a warm-up, and comes with the
machine and the versions it was taken with (`machine_info`), so a number never travels alone.
"""
import contextlib
import datetime
import os
import platform
import statistics
import time

import torch


def median(values):
    """statistics.median of a non-empty sequence; ValueError naming the problem otherwise."""
    values = list(values)
    if not values:
        raise ValueError("median: no samples (were all repetitions warm-up?)")
    return statistics.median(values)


class StepTimer:
    """Milliseconds of each timed region: perf_counter on the CPU, CUDA events on a GPU.

        timer = StepTimer(device)
        for ...:
            with timer:
                step()
        ms = timer.results()   # one float per region; synchronizes once on CUDA

    On CUDA the events are read only in `results()`, so timing adds no host-device sync of its own.
    A region that waits on the host (a loader) still counts: the GPU sits idle between the events.
    """

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._spans = []

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._spans.append([start, None])
        else:
            self._spans.append([time.perf_counter(), None])
        return self

    def __exit__(self, *exc):
        span = self._spans[-1]
        if self.cuda:
            span[1] = torch.cuda.Event(enable_timing=True)
            span[1].record()
        else:
            span[1] = time.perf_counter()
        return False

    def results(self):
        """Milliseconds per region, in order."""
        if self.cuda:
            torch.cuda.synchronize()  # note: a CPU-GPU sync point, once for all regions
            return [start.elapsed_time(end) for start, end in self._spans]
        return [(end - start) * 1e3 for start, end in self._spans]


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cpu_seconds():
    """CPU seconds (user + system) used so far by this process's threads and its live children.

    Children are read from /proc (Linux): DataLoader workers do their work there. Returns None
    where /proc is missing. On a machine that other work shares, CPU time per image is the
    steadier figure: wall time counts the waits for a core, CPU time only the work.
    """
    import resource
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    if not os.path.isdir("/proc/self"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    pid = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (name) "; the name may hold spaces
        if int(fields[1]) == pid:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module):
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # noqa: BLE001 - an absent or broken package is reported, not fatal
        return None


def machine_info(device="cpu"):
    """Where and with what a figure was taken: date, CPUs, load, versions, GPU name."""
    device = torch.device(device)
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_avg": load,  # 1, 5, 15 minutes: above the CPU count, other work shared the machine
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "dali": _version("nvidia.dali"),
        "pillow": _version("PIL"),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch uses `threads` CPU threads inside the block, then its previous count again."""
    if threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
