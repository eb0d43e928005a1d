"""An ImageNet-like JPEG folder for the ResNet-50 benchmarks, made from CIFAR-10 images, since no
ImageNet travels with the benchmarks.

Each image is a CIFAR-10 training image upscaled (bicubic) to one of ImageNet's common sizes
(500x375, 375x500, 500x333, 500x400, 640x480, 333x500; most ImageNet photos are about 500 pixels
on the long side) with noise (sigma 12 of 255) added so that it does not compress far better than a photo, and
saved as a quality-90 JPEG in its class folder. The sizes differ from image to image, as in
ImageNet, so the decode-on-device path's mixed-size handling is timed too. The mean file size is
printed: real ImageNet JPEGs average about 110 kB; smaller files decode faster.

    python -m benchmarks.make_jpeg_folder /data/cifar10/train /tmp/imagenet-like --images 4096
"""

from __future__ import annotations

import argparse
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (333, 500)]  # (width, height)


def _make(job) -> int:
    index, source, target = job
    rng = np.random.default_rng(index)
    with Image.open(source) as image:
        big = image.convert("RGB").resize(SIZES[index % len(SIZES)], Image.BICUBIC)
    pixels = np.asarray(big, dtype=np.float32) + rng.normal(0, 12, (big.height, big.width, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(target, quality=90)
    return target.stat().st_size


def make_folder(source: Path, target: Path, images: int, processes: int | None = None) -> float:
    """Write ``images`` images (taken in turn from each class of ``source``); returns the mean kB.
    They are written into a temporary folder renamed to ``target`` at the end, so that a folder
    named ``target`` is always whole."""
    classes = sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
    files = [sorted(c.glob("*.jpg")) for c in classes]
    if not classes or min(len(f) for f in files) * len(classes) < images:
        have = sum(len(f) for f in files)
        raise SystemExit(f"{source}: {len(classes)} class folders of JPEGs ({have} images, the smallest class "
                         f"{min((len(f) for f in files), default=0)}); {images} images taken in turn from each class "
                         "need more")
    partial = target.with_name(target.name + ".partial")
    jobs = []
    for i in range(images):
        c = i % len(classes)
        folder = partial / classes[c].name
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((i, files[c][i // len(classes)], folder / f"{i:06d}.jpg"))
    with Pool(processes or os.cpu_count()) as pool:
        sizes = pool.map(_make, jobs, chunksize=32)
    partial.rename(target)
    return sum(sizes) / len(sizes) / 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="CIFAR-10 JPEGs in class folders")
    parser.add_argument("target", type=Path, help="a new folder")
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.target.exists():
        raise SystemExit(f"{args.target}: exists; give a new folder")
    mean_kb = make_folder(args.source, args.target, args.images)
    print(f"{args.images} images in {args.target}, {mean_kb:.0f} kB on average", flush=True)


if __name__ == "__main__":
    main()
