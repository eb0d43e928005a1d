"""Where a fast-path step's time goes: each stage of GPU decoding and GPU augmentation timed on its
own, the device synchronised around it, for the two benchmark configurations.

- decode: 256 JPEGs of an ImageNet-like folder (``benchmarks.make_jpeg_folder``) through
  ``decode_jpeg(device="cuda")`` as one batch, one file at a time, on the CPU, and through our
  ``decode_batch`` (which falls back to the CPU for what nvjpeg rejects: it reports how many);
- read: DataLoader workers reading those files as bytes (``encoded_loader``), per batch;
- augment-224: ``BatchAugment(224)`` on the 256 decoded images of mixed sizes, eager and compiled,
  split into the crops (one product per image) and the batched photometric rest;
- augment-32: ``BatchAugment(32, blur=False)`` on 1,024 CIFAR-sized views, eager and compiled,
  with the host's own time (launching, no waiting) beside the device's;
- eval-crop: extraction's per-image resize and centre crop of the 256 decoded images.

    python -m benchmarks.fast_path_profile --jpeg /tmp/imagenet-like --out results/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from simsiam.data import scan_images
from simsiam.device_decode import decode_batch, encoded_loader
from simsiam.gpu_augment import BatchAugment, crop_boxes, per_image_settings, photometric, resized_crops

from .harness import environment, synchronize


def timed(function, device: torch.device, repeats: int = 3) -> dict:
    """Median seconds of ``repeats`` synchronised calls after one untimed call; and the host's time
    of the last call (until it returned, before synchronising)."""
    function()
    synchronize(device)
    seconds, host = [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        host = time.perf_counter() - start
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return {"s": round(sorted(seconds)[len(seconds) // 2], 5), "host_s": round(host, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpeg", required=True, help="an ImageNet-like JPEG folder")
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(device)}

    def record(name: str, value) -> None:
        results[name] = value
        print(json.dumps({name: value}), flush=True)
        (out / "fast_path_profile.json").write_text(json.dumps(results, indent=1))

    images = scan_images(args.jpeg)
    n = min(args.batch_size, len(images))
    paths = [str(images.root / p) for p in images.paths[:n]]
    payloads = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    record("files", {"n": n, "mean_kb": round(sum(len(p) for p in payloads) / n / 1024, 1)})

    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    try:
        record("decode_gpu_batched", timed(lambda: decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device), device))
    except RuntimeError as err:
        record("decode_gpu_batched", {"error": str(err)[:300]})
    try:
        record("decode_gpu_one_by_one", timed(
            lambda: [decode_jpeg(p, mode=ImageReadMode.RGB, device=device) for p in payloads], device, 1))
    except RuntimeError as err:
        record("decode_gpu_one_by_one", {"error": str(err)[:300]})
    record("decode_cpu_one_by_one_main_process", timed(
        lambda: [decode_image(p, mode=ImageReadMode.RGB) for p in payloads[:64]], device, 1) | {"images": 64})
    failed = {}

    def ours():
        decoded, bad = decode_batch(payloads, paths, device)
        failed.update(bad)
        return decoded
    record("decode_batch_ours", timed(ours, device) | {"fell_back_or_failed": len(failed)})

    loader = encoded_loader(images, batch_size=n, workers=args.workers)
    start, batches = time.perf_counter(), 0
    for batches, _ in enumerate(loader, start=1):
        if batches == 1:
            first = time.perf_counter() - start
            start = time.perf_counter()
        if batches == 9:
            break
    record("read_bytes_workers", {"first_batch_s": round(first, 3),
                                  "per_batch_s": round((time.perf_counter() - start) / max(batches - 1, 1), 4),
                                  "workers": args.workers})

    decoded, _ = decode_batch(payloads, paths, device)
    decoded = [d for d in decoded if d is not None]
    generator = torch.Generator().manual_seed(0)
    for size, blur, label in ((224, True, "augment_224"), (32, False, "augment_32")):
        eager = BatchAugment(size, blur=blur)
        if size == 224:
            batch = decoded + decoded  # two views of a batch, as the fast path augments them
        else:
            batch = torch.randint(0, 256, (1024, 3, 32, 32), dtype=torch.uint8, device=device)
        draws = eager.draw(len(batch), generator)
        row = {"views": len(batch), "eager": timed(lambda: eager(batch, draws), device)}
        heights = torch.tensor([b.shape[-2] for b in batch])
        widths = torch.tensor([b.shape[-1] for b in batch])
        boxes = crop_boxes(draws, heights, widths, eager.crop_scale).to(device)
        settings = per_image_settings(draws, blur).to(device)
        crops = resized_crops(batch, boxes, size)
        row["crops_eager"] = timed(lambda: resized_crops(batch, boxes, size), device)
        row["photometric_eager"] = timed(lambda: photometric(crops, settings, blur), device)
        row["draw_and_params_host"] = timed(lambda: (crop_boxes(draws, heights, widths, eager.crop_scale),
                                                     per_image_settings(draws, blur)), device)
        if not args.no_compile:
            start = time.perf_counter()
            compiled = BatchAugment(size, blur=blur, compile=True)
            compiled(batch, draws)
            synchronize(device)
            row["compile_s"] = round(time.perf_counter() - start, 1)
            row["compiled"] = timed(lambda: compiled(batch, draws), device)
        record(label, row)

    from torchvision.transforms.v2 import functional as TF

    def eval_crops():
        return [TF.center_crop(TF.resize(image, [256], antialias=True), [224]) for image in decoded]
    record("eval_crop_per_image", timed(eval_crops, device) | {"images": len(decoded)})


if __name__ == "__main__":
    main()
