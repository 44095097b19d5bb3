"""Progress for people: a tqdm bar on a terminal, plain lines elsewhere (CI, files)."""
import sys
import time

from tqdm import tqdm


class Progress:
    """Counts steps and images; shows images/s, loss and lr every `every` steps (and the last).

    `on_log(steps, {"loss", "lr", "img_s"})`, if given, receives the same values at the same steps,
    shown or not (the run logs' step rows, rmix.logs).
    """

    def __init__(self, total_steps, desc, *, enabled=True, every=20, stream=None, on_log=None):
        self.total, self.desc, self.enabled, self.every, self.on_log = total_steps, desc, enabled, every, on_log
        self.stream = stream or sys.stderr
        self.tty = self.enabled and self.stream.isatty()
        self.steps = self.images = 0
        self.bar = None

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.tty:
            self.bar = tqdm(total=self.total, desc=self.desc, unit="step", file=self.stream, leave=False,
                            dynamic_ncols=True)
        return self

    def update(self, images, loss=None, lr=None):
        self.steps += 1
        self.images += images
        if not (self.enabled or self.on_log) or (self.steps % self.every and self.steps != self.total):
            if self.bar is not None:
                self.bar.update(1)
            return
        rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
        loss = None if loss is None else float(loss)  # note: a CPU-GPU sync point, every `every` steps only
        if self.on_log is not None:
            self.on_log(self.steps, {"loss": loss, "lr": lr, "img_s": rate})
        if not self.enabled:
            return
        info = {"img/s": f"{rate:.0f}"}
        if loss is not None:
            info["loss"] = f"{loss:.3f}"
        if lr is not None:
            info["lr"] = f"{lr:.4g}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(info, refresh=True)
        else:
            fields = " ".join(f"{k} {v}" for k, v in info.items())
            print(f"{self.desc} step {self.steps}/{self.total} {fields}", file=self.stream, flush=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    @staticmethod
    def line(text, stream=None):
        """A line that stays (epoch summaries); goes around an active bar."""
        tqdm.write(text, file=stream or sys.stderr)
