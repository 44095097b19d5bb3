"""Where DALI's CPU train pipeline spends its time: the same reader and files, one resize option at a time.

    python scripts/dali_resize_options.py [--threads 2] [--batch 64]

Each variant is a bare pipeline (no per-epoch rebuild, no iterator), timed over 3 passes after a
warm-up pass on the synthetic 500x375 JPEGs of `rmix bench data` (generated once):
  decode         whole-image decode only (rmix bench data's ceiling)
  crop           ROI decode of a random-resized crop only (what rmix's pipeline decodes)
  linear_aa      crop + resize 224, linear, antialiased (rmix's pipeline) + flip
  linear         crop + resize 224, linear, no antialiasing + flip
  triangular     crop + resize 224, INTERP_TRIANGULAR + flip
  nearest        crop + resize 224, nearest neighbour + flip
  host_resize    crop in DALI; resize (torch's uint8 antialiased bilinear) and flip on
                 `pipelines.host_resize.HostResize`'s thread (rmix's CPU train graph)
  torch_resize   as host_resize, but in the consuming thread with torch's default intra-op
                 threads (every core): what host_resize's one-thread rule avoids
A research script for BENCHMARKS.md ("Where the time goes"), not part of the library.
"""
import argparse
import os
import tempfile
import time

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from rmix.bench.data import synthetic_jpegs
from rmix.pipelines import scan_image_folder
from rmix.pipelines.dali import write_file_list
from rmix.pipelines.host_resize import HostResize, resize_crops

RESIZE = {"linear_aa": dict(interp_type=types.INTERP_LINEAR, antialias=True),
          "linear": dict(interp_type=types.INTERP_LINEAR, antialias=False),
          "triangular": dict(interp_type=types.INTERP_TRIANGULAR),
          "nearest": dict(interp_type=types.INTERP_NN)}
VARIANTS = ("decode", "crop", *RESIZE, "host_resize", "torch_resize")


@pipeline_def
def variant_pipeline(root, file_list, variant, size):
    jpegs, labels = fn.readers.file(file_root=root, file_list=file_list, name="Reader")
    if variant == "decode":
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels
    images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
    if variant == "crop":
        return images, labels
    if variant in RESIZE:
        images = fn.resize(images, resize_x=size, resize_y=size, **RESIZE[variant])
        return fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5)), labels
    return images, labels, fn.random.coin_flip(probability=0.5)  # host_resize, torch_resize


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    index = scan_image_folder(synthetic_jpegs(args.images) / "train")
    batches = len(index.files) // args.batch
    with tempfile.TemporaryDirectory() as tmp:
        file_list = write_file_list(index, os.path.join(tmp, "files.txt"))
        print(f"{len(index.files)} files, batch {args.batch}, {args.threads} DALI threads")
        for variant in args.variants:
            pipe = variant_pipeline(index.root, file_list, variant, 224, batch_size=args.batch,
                                    num_threads=args.threads, device_id=None, seed=1)
            pipe.build()
            feed = HostResize(pipe, 4 * batches, 224) if variant == "host_resize" else None

            def one_pass(pipe=pipe, feed=feed, variant=variant):
                for _ in range(batches):
                    if feed is not None:
                        next(feed)
                        continue
                    outputs = pipe.run()
                    if variant == "torch_resize":
                        flips = np.array(outputs[2].as_tensor()).reshape(-1)
                        resize_crops(outputs[0], 224, flips)
            one_pass()  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(3):
                one_pass()
            n = 3 * batches * args.batch
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"{variant:<13}{n / wall:>8.0f} img/s {cpu * 1e3 / n:>7.2f} CPU ms/img", flush=True)
            if feed is not None:
                feed.close()
            pipe = feed = one_pass = None  # shut down before the next variant runs (one_pass's defaults hold them)


if __name__ == "__main__":
    main()
