"""rmix command line: click options mapped onto the frozen TrainConfig. Nothing else reads sys.argv."""
import json
import os
import sys

# Before torch loads libgomp: its OpenMP threads otherwise spin ~300k iterations waiting for work,
# and two runs on one machine spin against each other (BENCHMARKS.md, `rmix bench contention`).
# A user's value wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import click  # noqa: E402

from rmix import config as C  # noqa: E402
from rmix.pipelines.synth import DEFAULT_ARGS as SYNTH  # noqa: E402

# Nothing here imports torch, DALI or timm: `rmix --help` and shell completion stay fast; each command
# imports what it runs, and errors are sorted once one is raised (_sorted), when torch is loaded anyway.


def _sorted(e: Exception):
    """(exit code, one line) for an error a user can act on, or None for a bug (its traceback shows)."""
    from rmix.checkpoint import CheckpointError, SaveError
    from rmix.guard import TrainingError
    from rmix.pipelines import DecodeError, MissingPackage
    from rmix.pipelines.errors import one_line
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, CheckpointError, MissingPackage)):
        return 2, f"Error: {e}"
    if isinstance(e, DecodeError):  # outside training (show, bench, eval): the files, and where to look
        return 1, f"Error: {e}; `rmix data check` names every file that does not decode"
    if isinstance(e, (TrainingError, SaveError)):
        return 1, f"Error: {e}"
    if isinstance(e, RuntimeError) and _lost_peer(e):
        what = one_line(e, 300, typed=False, ellipsis=False)
        return 1, (f"Error: lost contact with another process of the job ({type(e).__name__}: {what}); "
                   "with --out and --resume auto, relaunching the job continues from its last checkpoint")
    return None


class RmixGroup(click.Group):
    """A click group whose errors are one line on stderr: `Error: <what>` and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            argv = list(sys.argv[1:] if args is None else args)
            hint = ("; the same command with `--resume auto` continues from the run's last checkpoint"
                    if argv[:1] == ["train"] else "")
            click.echo(f"Aborted!{hint}", err=True)
            sys.exit(1)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:
            known = _sorted(e)
            if known is None:
                raise
            click.echo(known[1], err=True)
            sys.exit(known[0])


def _lost_peer(error: RuntimeError) -> bool:
    """A collective failed because another process of the job died or hung (gloo raises plain
    RuntimeErrors for a reset connection); torchrun's summary names that process."""
    import torch.distributed
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return torch.distributed.is_initialized() and any(w in text for w in ("gloo", "NCCL", "Connection reset",
                                                                          "Connection closed", "Timed out"))


@click.group(cls=RmixGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """rmix: RecursiveMix, Mixup and CutMix training with DALI pipelines and a fused mixing op."""


# option name -> dotted TrainConfig field; None defaults mean "keep the config's value"
TRAIN_OPTIONS = [
    ("--data-dir", "data.data_dir", str, "ImageFolder root with train/ and val/, the CIFAR python batches, or "
                                         "the (Fashion-)MNIST idx files [default: the embedded synthetic set]"),
    ("--dataset", "data.dataset", click.Choice(C.DATASETS), "[default: auto, detected from --data-dir]"),
    ("--model", "model", str, "model name, see `rmix models`"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("--batch-size", "batch_size", int, "global batch size of an optimizer step, split over processes"),
    ("--accum-steps", "accum_steps", str,
     "accumulate gradients: each process's batch is cut into K micro-batches, one forward and backward each, "
     "then one optimizer step; auto = as many as make --micro-batch images a process [default: 1]"),
    ("--micro-batch", "micro_batch", int, "read by --accum-steps auto only: the images a process takes per forward "
                                          "[default: 0, or a preset's]"),
    ("--lr", "optim.lr", float, "peak learning rate"),
    ("--optimizer", "optim.optimizer", click.Choice(C.OPTIMIZERS), ""),
    ("--momentum", "optim.momentum", float, "SGD momentum"),
    ("--nesterov/--no-nesterov", "optim.nesterov", None, "Nesterov momentum [default: on]"),
    ("--weight-decay", "optim.weight_decay", float, ""),
    ("--schedule", "optim.schedule", click.Choice(C.SCHEDULES), "per-epoch lr schedule"),
    ("--milestones", "optim.milestones", str, "step schedule epochs, comma separated, e.g. 150,225"),
    ("--gamma", "optim.gamma", float, "step schedule factor"),
    ("--warmup", "optim.warmup", int, "linear warmup epochs"),
    ("--aug", "mix.policy", click.Choice(C.AUGS), "mixing policy"),
    ("--aug-alpha", "mix.alpha", float, "RM area ratio bound / Mixup-CutMix Beta alpha"),
    ("--aug-omega", "mix.omega", float, "RM consistency loss weight"),
    ("--interpolate", "mix.interpolate", click.Choice(C.INTERPOLATIONS), "RM history resize"),
    ("--per-sample-boxes/--batch-box", "mix.per_sample", None, "RM: one box per image [default: one per batch]"),
    ("--share-fc/--own-fc", "mix.share_fc", None, "RoI head reuses the classifier [default: own fc_roi]"),
    ("--shared-boxes/--rank-boxes", "mix.shared_boxes", None,
     "torchrun: every rank draws the same boxes and lam, as the paper's code [default: one stream per rank]"),
    ("--smoothing", "mix.smoothing", float, "label smoothing"),
    ("--smoothing-form", "mix.smoothing_form", click.Choice(C.SMOOTHING_FORMS),
     "paper: other classes get s/(K-1), as the RM code; uniform: s/K, as torch and timm"),
    ("--loader", "data.loader", click.Choice(C.LOADERS), "input pipeline"),
    ("--dali-device", "data.dali_device", click.Choice(C.DALI_DEVICES), "DALI decode device"),
    ("--torch-decode", "data.torch_decode", click.Choice(C.TORCH_DECODES),
     "torch loader, image folders: PIL in the workers, or torchvision.io.decode_jpeg on the device (nvJPEG)"),
    ("--crop-size", "data.crop_size", int, "train/val crop in pixels"),
    ("--min-area", "data.min_area", float, "random-resized-crop minimum area"),
    ("--val-resize", "data.val_resize", int, "val shorter side before the centre crop"),
    ("--aug-plus/--no-aug-plus", "data.aug_plus", None, "colour jitter + PCA lighting [default: off]"),
    ("--drop-last/--keep-last", "data.drop_last", None,
     "train: drop the partial last batch, or keep it as the paper's code [default: drop]"),
    ("--preflight/--no-preflight", "data.preflight", None, "decode every image once first, cached [default: on]"),
    ("--max-skipped-steps", "max_skipped_steps", int, "fp16: stop after this many overflowing steps in a row"),
    ("--workers", "data.workers", int, "loader threads/workers per process"),
    ("--device", "device", click.Choice(C.DEVICES), ""),
    ("--amp", "amp", click.Choice(C.AMPS),
     "autocast dtype [default: auto = bf16 on GPUs that compute it natively (sm_80 on), else fp16; fp32 on cpu]"),
    ("--compile", "compile", click.Choice(C.COMPILE_MODES),
     "torch.compile the model and its RoI head with this mode; bare --compile = default [default: none]",
     {"is_flag": False, "flag_value": "default"}),
    ("--deterministic/--no-deterministic", "deterministic", None,
     "cuda: deterministic kernels, so a rerun or resume is bit-identical (slower); off: cudnn.benchmark "
     "[default: off; the CPU is deterministic either way]"),
    ("--seed", "seed", int, ""),
    ("--out", "out", str, "run directory [default: runs/<model>-<aug>-<time>]"),
    ("--resume", "resume", str, "checkpoint to resume, or 'auto' (the run directory's latest.pt)"),
    ("--init-from", "init_from", str,
     "start from these weights: an rmix checkpoint, the paper's, or a torchvision or timm state dict (.pth, .pt, "
     ".safetensors); a classifier of another class count starts fresh, with the RoI head "
     "[default: none, the model's own init]"),
    ("--pretrained/--no-pretrained", "pretrained", None,
     "start from torchvision's or timm's pretrained weights for --model, through the library's own cache and "
     "download; the classifier and RoI head start fresh where the class count differs [default: off]"),
    ("--pretrained-file", "pretrained_file", str,
     "with --pretrained: read the library's weights from this local file (offline), not its cache or download"),
    ("--save-every-steps", "save_every_steps", int,
     "also checkpoint every N steps inside an epoch; resume continues at that step exactly [default: 0 = epoch ends]"),
    ("--log-every", "log_every", int, "steps between progress lines"),
    ("--log", "log", str, "run logs beside metrics.jsonl (and TensorBoard, when installed), comma-separated: wandb "
                          "(pip install 'rmix[wandb]'; WANDB_MODE=offline keeps it on this machine) [default: none]"),
    ("--eval-every", "eval_every", int, "evaluate every N epochs (and after the last)"),
    ("--train-per-class", "data.train_per_class", int,
     "train on the first N images of each class in file order [default: 0 = all]"),
    ("--max-steps", "max_steps", int, "cap steps per epoch, for smoke runs"),
    ("--sync-bn/--no-sync-bn", "sync_bn", None, "torchrun: SyncBatchNorm over all ranks, CUDA only [default: off]"),
    ("--ema", "ema", float, "keep a weight EMA with this decay (e.g. 0.9998), evaluated beside the model "
                            "[default: 0 = none]"),
    ("--ema-warmup/--no-ema-warmup", "ema_warmup", None, "timm's EMA warmup of the decay [default: off]"),
    ("--dist-timeout", "dist_timeout", int, "torchrun: seconds a collective waits for the other ranks "
                                           ""),
]


def _default(key):
    v = C.TrainConfig()
    for part in key.split("."):
        v = getattr(v, part)
    return v


def _option(flag, key, typ, help_, extra=None):
    dest = key.replace(".", "__")
    if "[default:" not in help_:
        help_ = f"{help_} [default: {_default(key)}]".strip()
    if typ is None:
        return click.option(flag, dest, default=None, help=help_)
    return click.option(flag, dest, type=typ, default=None, help=help_, **(extra or {}))


def train_options(f):
    for option in reversed(TRAIN_OPTIONS):
        f = _option(*option)(f)
    return f


def option_changes(opts: dict) -> dict:
    """The options the user gave (not None) as dotted config fields."""
    changes = {}
    for k, v in opts.items():
        if v is None:
            continue
        key = k.replace("__", ".")
        if key == "optim.milestones":
            try:
                v = tuple(int(m) for m in v.split(",") if m.strip())
            except ValueError:
                raise ValueError(f"--milestones: expected comma-separated epochs like 150,225, got {v!r}") from None
        if key == "accum_steps":
            try:
                v = 0 if v.strip() == "auto" else int(v)
            except ValueError:
                raise ValueError(f"--accum-steps: expected a number of micro-batches or auto, got {v!r}") from None
        if key == "log":
            v = tuple(name.strip() for name in v.split(",") if name.strip())
        changes[key] = v
    return changes


def option_fields() -> dict:
    """Command-line option names (`lr`, `aug-alpha`, `aug_alpha`) -> dotted config fields."""
    out = {}
    for flag, key, *_ in TRAIN_OPTIONS:
        name = flag.split("/")[0].lstrip("-")
        out[name] = out[name.replace("-", "_")] = key
    return out


def _allowed_field(name: str) -> str:
    """An --allow-changes name as a dotted field; ValueError naming it, with its close matches, if none."""
    from rmix.config_file import field_name
    try:
        return field_name(name, option_fields())
    except ValueError:
        import difflib
        names = sorted(set(C.field_types()) | set(option_fields()))
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `rmix train --help` lists the settings"
        raise ValueError(f"--allow-changes: {name!r} is not a config field{hint}") from None


@cli.command()
@click.option("--preset", default=None, help="start from a named recipe, see `rmix presets`")
@click.option("--config", "config_file", default=None, help="config file (.toml, .json, .yaml); options override it")
@click.option("--allow-changes", default=None,
              help="with --resume: settings that may differ from the run's, comma separated (e.g. epochs,lr); "
                   "recorded in RUN/changes.jsonl")
@train_options
def train(preset, config_file, allow_changes, **opts):
    """Train a model; prints the best validation top-1 at the end.

    Settings layer as: defaults < --preset < --config < command-line options. With --resume the
    run's saved settings come first, and a setting given with another value is refused unless
    --allow-changes names it.
    """
    from rmix.config_file import read
    from rmix.engine import train as run
    from rmix.presets import fields
    recipe = fields(preset) if preset else {}
    filed = read(config_file, option_fields()) if config_file else {}
    cfg, given = C.layer(recipe, filed, option_changes(opts))
    allow = {_allowed_field(n.strip()) for n in (allow_changes or "").split(",") if n.strip()}
    if allow and not opts.get("resume"):
        raise ValueError("--allow-changes: only a --resume compares settings with a saved run's; drop it")
    result = run(cfg, given=given, allow_changes=allow)
    stopped = result.get("preempted")
    if stopped and result.get("rank", 0) == 0:  # SIGTERM/SIGUSR1: saved where it stopped, exit 0
        at = f"epoch {stopped['epoch']}, step {stopped['step']}" if stopped["step"] else \
            f"the start of epoch {stopped['epoch']}"
        click.echo(f"stopped by {stopped['signal']} at {at}; {result['run_dir']}/latest.pt saved there; "
                   "the same command with `--resume auto` continues it", err=True)
        return
    if result.get("rank", 0) == 0:  # under torchrun every rank returns; one prints
        click.echo(f"run directory: {result['run_dir']}")
        final = "n/a" if result["final_top1"] is None else f"{result['final_top1']:.2f}%"
        click.echo(f"best val top-1: {result['best_top1']:.2f}%  (final {final})")


@cli.command("eval")
@click.option("--checkpoint", "path", required=True, help="checkpoint file (rmix, or the paper's layout with --model)")
@click.option("--data-dir", default=None, help="ImageFolder root or CIFAR folder [default: the checkpoint's]")
@click.option("--dataset", type=click.Choice(C.DATASETS), default=None, help="[default: the checkpoint's, or auto]")
@click.option("--model", default=None, help="model name, for checkpoints without an rmix config")
@click.option("--loader", type=click.Choice(C.LOADERS), default=None, help="[default: the checkpoint's]")
@click.option("--batch-size", type=int, default=None, help="[default: the checkpoint's]")
@click.option("--device", type=click.Choice(C.DEVICES), default="auto")
@click.option("--ema", is_flag=True, help="evaluate the checkpoint's EMA weights (runs trained with --ema)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_cmd(path, data_dir, dataset, model, loader, batch_size, device, ema, as_json):
    """Evaluate a checkpoint on the validation split (top-1 / top-5 in percent)."""
    from rmix.engine import evaluate_checkpoint
    r = evaluate_checkpoint(path, data_dir=data_dir, dataset=dataset, model=model, loader=loader, batch_size=batch_size,
                            device=device, ema=ema)
    if as_json:
        click.echo(json.dumps(r))
    else:
        loss = "n/a" if r["loss"] is None else f"{r['loss']:.4f}"
        top5 = "n/a (5 classes or fewer)" if r["top5"] is None else f"{r['top5']:.2f}%"
        click.echo(f"top-1 {r['top1']:.2f}%  top-5 {top5}  loss {loss}  "
                   f"({r['images']} images, {r['model']})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print every preset's full resolved config as JSON")
def presets(as_json):
    """List the named recipes (the paper's commands)."""
    from rmix.presets import PRESETS, preset
    if as_json:
        click.echo(json.dumps({name: C.to_dict(preset(name)) for name in sorted(PRESETS)}, indent=2))
        return
    for name in sorted(PRESETS):
        click.echo(f"{name:<28} {PRESETS[name][0]}")


@cli.group()
def data():
    """Datasets: prepare ImageNet or shards, write the embedded synthetic set, check for unreadable images."""


@data.command()
@click.option("--out", required=True, help="directory to write train/ and val/ into")
@click.option("--classes", type=int, default=SYNTH["classes"], show_default=True)
@click.option("--train-per-class", type=int, default=SYNTH["train_per_class"], show_default=True)
@click.option("--val-per-class", type=int, default=SYNTH["val_per_class"], show_default=True)
@click.option("--width", type=int, default=SYNTH["width"], show_default=True, help="500 for ImageNet-sized files")
@click.option("--height", type=int, default=SYNTH["height"], show_default=True, help="375 for ImageNet-sized files")
@click.option("--seed", type=int, default=SYNTH["seed"], show_default=True)
@click.option("--quality", type=int, default=SYNTH["quality"], show_default=True, help="JPEG quality")
def synth(out, classes, train_per_class, val_per_class, width, height, seed, quality):
    """Write the deterministic synthetic JPEG dataset (ImageFolder layout)."""
    from rmix.outputs import check_out
    from rmix.pipelines.synth import synth_dataset
    out = check_out(out, directory=True)
    try:
        path = synth_dataset(out, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                             width=width, height=height, seed=seed, quality=quality)
    except FileExistsError:  # a different set, or anything else: never written into
        raise ValueError(f"--out: {out} is not empty and is not a synth set of these parameters; "
                         "give a new or empty folder") from None
    click.echo(str(path))


@data.command()
@click.argument("directory")
@click.option("--dataset", type=click.Choice(C.DATASETS), default="auto", show_default=True,
              help="fashion-mnist / mnist: read and check the idx files")
@click.option("--decoder", type=click.Choice(["dali", "pil"]), default="dali", show_default=True,
              help="the decoder training will use (--loader dali, or torch's PIL)")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help='print {"ok": n, "bad": [{"path", "reason"}], "classes": k}')
def check(directory, dataset, decoder, threads, as_json):
    """Decode every image once and name each unreadable file; exit 1 if any."""
    from rmix.data import ARRAY_SETS, check_data
    from rmix.pipelines.preflight import summary
    dataset, result = check_data(directory, dataset, decoder, threads)
    if as_json:
        click.echo(json.dumps(result))
    else:
        for split, c in result.get("shards", {}).items():  # a short set shows here
            how = "as index.json records" if c["verified"] else "no index.json: counted from the shards"
            click.echo(f"{split}: {c['samples']} samples in {c['shards']} shards ({how})")
        for b in result["bad"]:
            click.echo(f"{b['path']}: {b['reason']}")
        if dataset in ARRAY_SETS:  # whole files, each holding a split or part of one: no image is read alone
            read = ", ".join(f"{split} {n}" for split, n in result["splits"].items()) or "no split whole"
            click.echo(f"{result['ok']} images read ({read}), {len(result['bad'])} damaged file(s), "
                       f"{result['classes']} classes")
        else:
            click.echo(f"{result['ok']} images decode, {len(result['bad'])} do not, {result['classes']} classes")
    if result["bad"]:
        if not as_json:
            bad = result["bad"]
            what = (f"{len(bad)} damaged file(s): " + ", ".join(f"{b['path']} ({b['reason']})" for b in bad[:5])
                    if dataset in ARRAY_SETS else summary(result))
            click.echo(f"Error: {what}", err=True)
        sys.exit(1)


@data.group()
def prepare():
    """Write a dataset in the layout rmix trains on: an ImageFolder, or WebDataset shards."""


def _prepare_options(f):
    f = click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="images per shard (wds)")(f)
    f = click.option("--out", required=True, help="directory to write into (new or empty, or an unfinished "
                     "preparation with the same settings, which continues)")(f)
    return f


def _preparing(run):
    """Run a preparation; an OSError midway (a full disk, ...) is one line saying a rerun continues."""
    try:
        run()
    except OSError as e:
        where = f" {e.filename}" if e.filename else ""
        raise ValueError(f"--out: writing{where} failed ({e.strerror or e}); nothing complete was lost: "
                         "the same command continues where it stopped") from None


@prepare.command("imagenet")
@click.option("--archives", required=True, help="folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar "
              "and ILSVRC2012_devkit_t12.tar.gz")
@click.option("--format", "fmt", type=click.Choice(["folder", "wds"]), default="folder", show_default=True,
              help="folder: train/<wnid>/, val/<wnid>/; wds: train-NNNNNN.tar, val-NNNNNN.tar shards")
@_prepare_options
@click.option("--skip-md5", is_flag=True, help="take archives whose md5 is not the published one")
def prepare_imagenet_cmd(archives, fmt, out, shard_size, skip_md5):
    """ImageNet 2012 from the three archives image-net.org gives (torchvision's parsers and md5s)."""
    from rmix.pipelines.prepare import prepare_imagenet
    _preparing(lambda: prepare_imagenet(archives, out, fmt=fmt, shard_size=shard_size, skip_md5=skip_md5,
                                        say=lambda t: click.echo(t, err=True)))


@prepare.command("folder")
@click.option("--src", required=True, help="an ImageFolder: src/train/<class>/..., src/val/<class>/...")
@click.option("--format", "fmt", type=click.Choice(["folder", "wds"]), default="wds", show_default=True)
@_prepare_options
def prepare_folder_cmd(src, fmt, out, shard_size):
    """Any ImageFolder to WebDataset shards (or copied in rmix's layout)."""
    from rmix.pipelines.prepare import prepare_folder
    _preparing(lambda: prepare_folder(src, out, fmt=fmt, shard_size=shard_size, say=lambda t: click.echo(t, err=True)))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def models(as_json):
    """List the models with their parameter counts (classifier included, RoI head excluded)."""
    from rmix.models import list_models, model_family, param_count
    rows = []
    for name in list_models():
        k = 10 if model_family(name) == "cifar" else 1000
        rows.append({"name": name, "family": model_family(name), "params": param_count(name, k), "num_classes": k})
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['name']:<22} {r['family']:<9} {r['params'] / 1e6:8.2f}M  ({r['num_classes']} classes)")


@cli.group()
def bench():
    """Benchmarks: each prints the fused/new path beside its baseline, in one run."""


@bench.command("mix")
@click.option("--batch", type=int, default=256, show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="image side, pixels")
@click.option("--device", type=click.Choice(C.DEVICES[1:]), default="cpu", show_default=True)
@click.option("--mode", type=click.Choice(C.INTERPOLATIONS), default="nearest", show_default=True)
@click.option("--dtype", "dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="output dtype")
@click.option("--reps", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
@click.option("--json", "as_json", is_flag=True)
def bench_mix_cmd(batch, size, device, mode, dtype, reps, threads, as_json):
    """The fused mixing op against the paper's unfused steps, same inputs, one run."""
    import torch

    from rmix.bench.mix import bench_mix, format_bench
    for name, v in (("--batch", batch), ("--size", size), ("--reps", reps), ("--threads", 1 if threads is None else threads)):
        if v < 1:
            raise ValueError(f"{name}: must be positive, got {v}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but no CUDA device is available")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    d = bench_mix(batch=batch, size=size, device=device, reps=reps, mode=mode, out_dtype=dt, threads=threads)
    click.echo(json.dumps(d) if as_json else format_bench(d))


# --- bench data, bench train (rmix/bench/data.py, rmix/bench/train.py) ---
@bench.command("data")
@click.option("--data-dir", default=None, help="ImageFolder root (its train/) or split, or WebDataset shards "
                                               "(then: shards vs the same images as files) "
                                               "[default: ImageNet-sized synthetic JPEGs]")
@click.option("--batch", type=int, default=None, help="[default: 64, or 256 on cuda]")
@click.option("--threads", type=int, default=None, help="DALI threads = DataLoader workers [default: all cores]")
@click.option("--size", type=int, default=224, show_default=True, help="crop side, pixels")
@click.option("--min-area", type=float, default=0.08, show_default=True, help="random-resized-crop area bound")
@click.option("--reps", type=int, default=3, show_default=True, help="timed passes (epochs) after a warm-up pass")
@click.option("--images", type=int, default=None, help="files per pass [default: 1024, or 4 batches]")
@click.option("--device", type=click.Choice(C.DEVICES[1:]), default="cpu", show_default=True,
              help="where the batches are delivered")
@click.option("--dali-device", type=click.Choice(C.DALI_DEVICES), default="auto", show_default=True,
              help="DALI decode: gpu = nvJPEG mixed (implies --device cuda); auto = gpu on cuda")
@click.option("--decoders", is_flag=True, help="instead: whole-image JPEG decode, one thread, PIL vs torchvision vs "
                                               "TorchCodec (img/s, and pixels against PIL's)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_data_cmd(data_dir, batch, threads, size, min_area, reps, images, device, dali_device, decoders, as_json):
    """Train-pipeline img/s on the same files and threads: DALI, torchvision+PIL, torchvision v2, decode only."""
    from rmix.bench.data import bench_data, bench_decoders, format_bench
    if decoders:
        d = bench_decoders(data_dir, images=images, reps=reps, log=lambda m: click.echo(m, err=True))
    else:
        d = bench_data(data_dir, batch=batch, threads=threads, size=size, reps=reps, images=images,
                       min_area=min_area, device=device, dali_device=dali_device, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(d) if as_json else format_bench(d))


@bench.command("train")
@click.option("--model", default="resnet8", show_default=True, help="see `rmix models`")
@click.option("--batch", type=int, default=128, show_default=True)
@click.option("--size", type=int, default=32, show_default=True, help="crop side, pixels")
@click.option("--steps", type=int, default=20, show_default=True, help="timed steps per run")
@click.option("--warmup", type=int, default=5, show_default=True, help="untimed steps first")
@click.option("--device", type=click.Choice(C.DEVICES[1:]), default="cpu", show_default=True)
@click.option("--amp", type=click.Choice(C.AMPS), default="auto", show_default=True,
              help="auto = bf16 on GPUs that compute it natively, else fp16")
@click.option("--channels-last", is_flag=True, help="channels_last model and inputs (cuda, as rmix train)")
@click.option("--data-dir", default=None, help="data of the pipeline run [default: the embedded synthetic set]")
@click.option("--loader", type=click.Choice(C.LOADERS), default="dali", show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="loader threads / DataLoader workers")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
@click.option("--compile", "compile_mode", type=click.Choice(C.COMPILE_MODES[1:]), is_flag=False,
              flag_value="default", default=None, help="also torch.compile'd runs with this mode, beside eager")
@click.option("--torch-decode", type=click.Choice(C.TORCH_DECODES), default="workers", show_default=True,
              help="torch loader: PIL in the workers, or torchvision.io.decode_jpeg on the device (nvJPEG)")
@click.option("--compiled", type=click.Choice(["both", "rm"]), default="both", show_default=True,
              help="with --compile: none and recursive_mix compiled, or recursive_mix alone (one graph)")
@click.option("--deterministic", is_flag=True,
              help="also recursive_mix with `rmix train --deterministic`'s kernels: what cuDNN's and torch's "
                   "deterministic choices cost (cuBLAS's workspace setting is the whole process's)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_train_cmd(model, batch, size, steps, warmup, device, amp, channels_last, data_dir, loader, workers,
                    threads, compile_mode, torch_decode, compiled, deterministic, as_json):
    """Train-step img/s: recursive_mix vs none in memory, and recursive_mix fed by the real loader."""
    from rmix.bench.train import bench_train, format_bench
    d = bench_train(model, batch=batch, size=size, steps=steps, warmup=warmup, device=device, amp=amp,
                    channels_last=channels_last, data_dir=data_dir, loader=loader, workers=workers,
                    threads=threads, compile_mode=compile_mode or "none", torch_decode=torch_decode,
                    deterministic=deterministic, compiled=compiled, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(d) if as_json else format_bench(d))


@bench.command("soak")
@click.option("--steps", type=int, default=3000, show_default=True, help="training steps (whole epochs of 8)")
@click.option("--loader", type=click.Choice(C.LOADERS), default="dali", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch CPU threads (1: steady on a machine other work shares)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_soak_cmd(steps, loader, threads, as_json):
    """Resident memory over thousands of RM steps on tiny data (train/eval alternating); exit 1 without a plateau."""
    from rmix.bench.soak import format_soak, soak
    d = soak(steps, loader=loader, threads=threads, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(d) if as_json else format_soak(d))
    if d["plateau"] is False:
        click.echo(f"Error: resident memory grew {d['growth_pct']:.2f}% after warm-up "
                   f"({d['warmup_rss_mb']:.1f} -> max {d['max_after_warmup_mb']:.1f} MB), limit {d['limit_pct']:.0f}%",
                   err=True)
        sys.exit(1)


@bench.command("contention")
@click.option("--epochs", type=int, default=5, show_default=True, help="epochs of each `rmix train` (embedded set)")
@click.option("--procs", type=int, default=2, show_default=True, help="runs started together")
@click.option("--reps", type=int, default=1, show_default=True, help="repetitions (medians)")
@click.option("--policies", default="rmix,libgomp", show_default=True,
              help="OpenMP wait policies to compare: rmix, libgomp, passive, spin:N (GOMP_SPINCOUNT=N)")
@click.option("--max-steps", type=int, default=None, help="steps per epoch of each run [default: all]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_contention_cmd(epochs, procs, reps, policies, max_steps, as_json):
    """`rmix train` alone against several at once, per OpenMP wait policy: the slowdown as ratios."""
    from rmix.bench.contention import contention, format_contention
    d = contention(epochs=epochs, procs=procs, reps=reps, policies=tuple(p for p in policies.split(",") if p),
                   max_steps=max_steps, log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(d) if as_json else format_contention(d))


@cli.command()
@click.option("--device", type=click.Choice(C.DEVICES), default="auto", show_default=True,
              help="auto: the GPU where there is one")
@click.option("--json", "as_json", is_flag=True, help='print {"versions", "checks", "ok"}')
def doctor(device, as_json):
    """Versions and whether they match; the GPU path against its references (kernel, decoders, 20 steps each loader)."""
    from rmix.doctor import doctor as run
    from rmix.doctor import format_doctor
    d = run(device, log=None if as_json else lambda m: click.echo(m, err=True))
    click.echo(json.dumps(d) if as_json else format_doctor(d))
    if not d["ok"]:
        sys.exit(1)


# --- views: plot, show, export (rmix/plot.py, rmix/show.py, rmix/export.py) ---
@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", default="curves.png", show_default=True, help="PNG to write (1000 x 750 px)")
@click.option("--title", default=None, help="figure title")
def plot(run_dirs, out, title):
    """Plot the training curves of one or more run directories, overlaid (needs matplotlib)."""
    from rmix.outputs import check_out
    from rmix.plot import plot_runs
    check_out(out, inputs=[os.path.join(d, name) for d in run_dirs for name in ("metrics.jsonl", "config.json")])
    click.echo(str(plot_runs(run_dirs, out, title=title)))


@cli.command()
@click.option("--data-dir", default=None, help="ImageFolder root, CIFAR or (Fashion-)MNIST folder "
                                            "[default: the embedded synthetic set]")
@click.option("--dataset", type=click.Choice(C.DATASETS), default="auto", show_default=True)
@click.option("--aug", type=click.Choice(C.AUGS), default="recursive_mix", show_default=True)
@click.option("--steps", type=int, default=3, show_default=True, help="steps to run; the last batch is drawn")
@click.option("--batch", type=int, default=16, show_default=True, help="batch size (images in the grid)")
@click.option("--loader", type=click.Choice(C.LOADERS), default="dali", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True, help="as train's --aug-alpha")
@click.option("--crop-size", type=int, default=None, help="crop in pixels [default: 32]")
@click.option("--tile", type=int, default=128, show_default=True, help="tile side in pixels (nearest upscale)")
@click.option("--out", default="grid.png", show_default=True, help="PNG to write")
def show(data_dir, dataset, aug, steps, batch, loader, seed, alpha, crop_size, tile, out):
    """Draw the last mixed batch of a few loader + policy steps as a captioned PNG grid."""
    from rmix.outputs import check_out
    from rmix.show import show as run
    check_out(out, inputs=[data_dir] if data_dir else [])
    if seed < 0:  # torch.Generator's own message names nothing
        raise ValueError(f"--seed: must be >= 0, got {seed}")
    changes = {"data.data_dir": data_dir or "", "data.dataset": dataset, "mix.policy": aug, "batch_size": batch, "data.loader": loader,
               "seed": seed, "mix.alpha": alpha, "device": "cpu"}
    if crop_size is not None:
        changes.update({"data.crop_size": crop_size, "data.val_resize": max(crop_size, C.DataConfig.val_resize)})
    try:
        path, (w, h) = run(C.replace(C.TrainConfig(), **changes), steps=steps, out=out, tile=tile)
    except ValueError as e:  # the config checks name train's options; say show's
        raise ValueError(_show_names(str(e))) from None
    click.echo(f"{path} ({w} x {h} px)")


# train's option names in config messages -> show's (a message is about what the user typed)
_SHOW_NAMES = {"--batch-size": "--batch", "--aug-alpha": "--alpha",
               "(train drops the partial batch; --keep-last keeps it)": "(a smaller --batch fits)"}


def _show_names(message: str) -> str:
    for train_name, show_name in _SHOW_NAMES.items():
        message = message.replace(train_name, show_name)
    return message


@cli.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", type=click.Choice(C.EXPORT_FORMATS), default=None,
              help="")
@click.option("--out", required=True, help="file to write")
@click.option("--drop-classifier", is_flag=True, help="leave out fc.* (for detection / segmentation backbones)")
@click.option("--ema", is_flag=True, help="export the checkpoint's EMA weights")
@click.option("--model", default=None, help="model name, for checkpoints without an rmix config")
def export(checkpoint, fmt, out, drop_classifier, ema, model):
    """Export a checkpoint's weights under torchvision key names, without the RoI head (docs/EXPORT.md)."""
    from rmix.export import export as run
    from rmix.outputs import check_out
    check_out(out, inputs=[checkpoint])
    info = run(checkpoint, out, fmt, model=model, drop_classifier=drop_classifier, ema=ema)
    click.echo(f"{info['out']}: {info['format']}, {info['model']}, {info['tensors']} tensors "
               f"(dropped {info['dropped_roi']} RoI-head and {info['dropped_classifier']} classifier tensors)")
# --- end views ---


def main():
    cli(prog_name="rmix")


if __name__ == "__main__":
    main()
