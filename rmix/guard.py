"""Bad steps, found on the device and reported by the host later: no CPU-GPU sync in the step.

A step whose loss or gradients are not finite must never reach the weights. Reading that from
the device every step would make the host wait for the backward pass before it can queue the
next step, so the decision stays on the device: `found_inf` goes to a fused optimizer, which
skips the update in its kernel (the contract GradScaler uses: `optimizer.found_inf`), and
`StepGuard` keeps the facts in device tensors. The host reads them only where it reads a value
anyway (the progress line, a checkpoint, the epoch end: `check`), and raises there, naming the
first bad step; the steps in between were skipped on the device too.

With fp16, GradScaler skips overflowing steps as part of its scaling; the guard counts them in a
row on the device and stops the run after `max_skipped` of them.
"""
import torch


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, ...); the message says where."""


def nonfinite(loss, optimizer) -> torch.Tensor:
    """A one-element float tensor on the device: 1. when `loss` or any gradient is inf/NaN, else 0."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    found = (~torch.isfinite(loss.detach().float())).float().reshape(1)
    if grads:  # GradScaler's own check; the gradients are multiplied by 1 (unchanged)
        for (device, _), group in _by_device_and_dtype(grads).items():
            f = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, f, torch.ones(1, device=device))
            found = torch.maximum(found, f.to(found.device))
    return found


def step_skipping(optimizer, found_inf):
    """optimizer.step(), skipped where `found_inf` is 1: on the device for a fused optimizer.

    Any other optimizer (a user's own, foreach or single-tensor SGD) refuses `found_inf`, so
    for it the host reads the flag and skips the call (note: a CPU-GPU sync point).
    """
    if not all(g.get("fused") for g in optimizer.param_groups):
        if not bool(found_inf.reshape(()) > 0):
            optimizer.step()
        return
    optimizer.found_inf, optimizer.grad_scale = found_inf.reshape(()), None  # 0-dim, as fused AdamW's step counts
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale


def _by_device_and_dtype(tensors):
    out = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


class StepGuard:
    """Per-step facts in device tensors: the first non-finite step and its loss, fp16 skips in a row.

        guard = StepGuard(max_skipped)
        guard.update(step, bad, loss, fp16)   # device ops only
        guard.check(epoch)                     # note: a CPU-GPU sync point; raises TrainingError

    Kept across epochs by the trainer, so that fp16 skips in a row span an epoch boundary.
    """

    def __init__(self, max_skipped: int):
        self.max_skipped = max_skipped
        self.t = None  # float64 [first bad step or -1, its loss, skips in a row, step they passed the limit or -1]

    def update(self, step: int, bad: torch.Tensor, loss: torch.Tensor, fp16: bool):
        if self.t is None:
            self.t = torch.tensor([-1.0, 0.0, 0.0, -1.0], dtype=torch.float64, device=bad.device)
        bad = bad.reshape(()).to(torch.float64) > 0
        first, first_loss, in_a_row, over = self.t.unbind()
        if fp16:  # a skip is GradScaler's business; only too many in a row is an error
            in_a_row = torch.where(bad, in_a_row + 1, torch.zeros_like(in_a_row))
            over = torch.where((over < 0) & (in_a_row > self.max_skipped), float(step), over)
        else:
            new = bad & (first < 0)
            first = torch.where(new, float(step), first)
            first_loss = torch.where(new, loss.detach().reshape(()).to(torch.float64), first_loss)
        self.t = torch.stack([first, first_loss, in_a_row, over])

    def check(self, epoch: int):
        """Raise TrainingError for what happened since the run began; returns nothing when all is well."""
        if self.t is None:
            return
        first, first_loss, _, over = (float(v) for v in self.t.cpu())  # note: a CPU-GPU sync point
        if first >= 0:
            raise TrainingError(f"non-finite loss ({first_loss:.4g}) or gradients at epoch {epoch}, step {int(first) + 1}; "
                                "its update was skipped, and the run stopped with no checkpoint written after it")
        if over >= 0:
            raise TrainingError(f"fp16 gradients overflowed {self.max_skipped + 1} steps in a row at epoch {epoch}, "
                                f"step {int(over) + 1} (--max-skipped-steps {self.max_skipped}); try --amp bf16")
