"""The optimizer: fused SGD or AdamW, its per-epoch learning rate, and its state made fit for a resume."""
import torch

from rmix.schedule import lr_at


def build_optimizer(model, o):
    """SGD or AdamW, fused: their kernels take `found_inf` and skip a bad step on the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if o.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=True)
    init_momentum(opt)
    return opt


def init_momentum(optimizer):
    """Zero SGD momentum buffers before the first step. Fused SGD allocates them uninitialized on its
    first step and fills them in its kernel, which a skipped step never runs: the next step would then
    read garbage. With dampening 0, `buf = momentum * 0 + grad` is the first step's `buf = grad`, exactly."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for g in optimizer.param_groups:
        if g["momentum"] and not g["dampening"]:
            for p in g["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def match_param_layout(optimizer):
    """Lay each per-parameter state tensor (momentum, Adam's moments) out as its parameter is:
    same device, dtype and strides. `Optimizer.load_state_dict` keeps the saved strides, so a
    checkpoint of a channels_last CUDA run resumed on the CPU (or the reverse) would hand the
    fused kernels a buffer laid out unlike its parameter: CUDA's fused SGD/AdamW refuse it, and
    the CPU's fused SGD walks the two in different element orders (wrong momentum, silently).
    Scalars (Adam's `step`) are left where torch put them."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and (
                    v.stride() != p.stride() or v.device != p.device or v.dtype != p.dtype):
                state[k] = torch.empty_like(p).copy_(v)  # empty_like keeps p's strides (preserve_format)


def load_optimizer_state(optimizer, state: dict):
    """`optimizer.load_state_dict(state)`, then laid out and flagged as this run's own optimizer is."""
    optimizer.load_state_dict(state)
    match_param_layout(optimizer)  # saved by a run on another device or memory format
    for g in optimizer.param_groups:  # checkpoints before the fused optimizer saved fused=None
        g["fused"], g["foreach"] = True, None
    init_momentum(optimizer)


def set_lr(optimizer, cfg, epoch) -> float:
    """The paper's per-epoch learning rate (1-based epoch) into every param group; returns it."""
    lr = lr_at(epoch, cfg.optim.lr, cfg.epochs, schedule=cfg.optim.schedule, warmup=cfg.optim.warmup,
               milestones=cfg.optim.milestones, gamma=cfg.optim.gamma)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr
