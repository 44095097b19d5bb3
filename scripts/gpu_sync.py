"""Host syncs of rmix's training step on a CUDA device, as torch's sync-debug mode sees them; one JSON line a policy.

    python scripts/gpu_sync.py [--model resnet18] [--batch 64] [--size 112] [--steps 10]

torch.cuda.set_sync_debug_mode("warn") makes every synchronizing CUDA call torch makes (a device
value read, a blocking copy) warn; waits inside nvJPEG, DALI or the caching allocator are not seen.
Each policy trains one pass of `steps` in-memory batches and one of
2 x `steps` through the engine's own `train_one_epoch` (no logging step inside): the difference
is what the steps themselves sync, and must be 0; what is left is the pass's end (the guard and
the statistics). The CPU test of the same property is tests/test_sync.py.
"""
import argparse
import collections
import json
import os
import sys

import torch  # noqa: E402

from rmix import config as C  # noqa: E402
from rmix.engine import amp_dtype, build_optimizer, compile_model, make_policy, train_one_epoch  # noqa: E402
from rmix.models import build  # noqa: E402
from rmix.progress import Progress  # noqa: E402
from rmix.state import RunState  # noqa: E402
from rmix.syncs import cuda_sync_warnings  # noqa: E402


def syncs_in_pass(cfg, model, optimizer, scaler, policy, amp, batches):
    """(number of synchronizing calls in one pass over `batches`, where they came from)."""
    torch.cuda.synchronize()
    with cuda_sync_warnings() as hits:
        with Progress(len(batches), "sync", enabled=False) as bar:
            train_one_epoch(model, policy, batches, optimizer, scaler, cfg, RunState(), amp, bar)
    return len(hits), collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in hits)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", default="none", choices=C.COMPILE_MODES)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(1)
    device = torch.device("cuda")
    for policy_name in ("recursive_mix", "none"):
        cfg = C.replace(C.with_dataset_stats(C.TrainConfig(), "imagenet"), model=args.model, num_classes=100,
                        device="cuda", log_every=10 ** 6, compile=args.compile, **{"mix.policy": policy_name})
        torch.manual_seed(0)
        model = build(cfg.model, cfg.num_classes).to(device, memory_format=torch.channels_last)
        if policy_name != "recursive_mix":
            model.fc_roi.requires_grad_(False)
        optimizer = build_optimizer(model, cfg.optim)
        model = compile_model(model, cfg.compile)
        amp = amp_dtype(cfg, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        policy = make_policy(cfg, device, amp)
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=g).cuda(),
                    torch.randint(0, cfg.num_classes, (args.batch,), generator=g).cuda()) for _ in range(2 * args.steps)]
        syncs_in_pass(cfg, model, optimizer, scaler, policy, amp, batches[:3])  # warm-up: kernels, compile
        short, where_short = syncs_in_pass(cfg, model, optimizer, scaler, policy, amp, batches[:args.steps])
        long, where_long = syncs_in_pass(cfg, model, optimizer, scaler, policy, amp, batches)
        print(json.dumps({"policy": policy_name, "model": args.model, "batch": args.batch, "size": args.size,
                          "compile": args.compile, "amp": str(amp).replace("torch.", ""),
                          "steps": args.steps, "syncs_in_pass": short, "syncs_in_double_pass": long,
                          "syncs_per_step": (long - short) / args.steps, "pass_end_syncs": dict(where_short),
                          "step_syncs": dict(where_long - where_short)}), flush=True)


if __name__ == "__main__":
    main()
