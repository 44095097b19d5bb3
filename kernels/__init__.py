"""The fused RecursiveMix op: `recursive_mix`, Triton on CUDA tensors, the torch reference elsewhere.

Importing the package loads no torch (the config and `rmix --help` read `MODES` here); the op does."""
MODES = ("nearest", "bilinear")  # how the history batch is resized into its box
BACKENDS = ("auto", "torch", "triton")


def recursive_mix(images, history, targets, history_targets, boxes, *, mode="nearest",
                  num_classes=None, mean=None, std=None, out=None, out_dtype=None, backend="auto",
                  check_values=True):
    """Normalize `images`, paste resized `history` into `boxes`, mix the labels; one pass.

    Returns (mixed_images (N, C, H, W), mixed_targets float32 (N, K), lam float32 (N,)).
    See kernels/mix_ref.py for the exact contract. Targets and history_targets are checked as the
    policies check theirs (rmix.mixing.check_targets): shapes and dtypes always, values where they
    are CPU tensors. `check_values=False` skips the value reads (the policies, whose inputs are
    checked already). backend "triton" takes CUDA tensors, or CPU ones under TRITON_INTERPRET=1.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if images.is_cuda and _triton_available() else "torch"
    if backend == "torch":
        from rmix.kernels.mix_ref import recursive_mix_ref as fn
    elif not _triton_available():
        raise ValueError("backend: 'triton' needs the triton package, which is not installed (use backend='torch')")
    else:
        from rmix.kernels.mix_triton import recursive_mix_triton as fn  # lazy: Triton is GPU-only baggage
    return fn(images, history, targets, history_targets, boxes, mode=mode, num_classes=num_classes,
              mean=mean, std=std, out=out, out_dtype=out_dtype, check_values=check_values)


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
