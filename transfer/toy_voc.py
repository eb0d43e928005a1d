"""A tiny synthetic dataset in PASCAL VOC's format, to try the detection path in minutes on a CPU.

``VOCdevkit/VOC2007`` (trainval and test) and ``VOCdevkit/VOC2012`` (trainval): JPEG images of
coloured rectangles and ellipses on noise, one colour and shape per VOC class name, with their
boxes in VOC XML (1-based pixel coordinates, as the real annotations). Every class appears in the
test split, so each of the 20 per-class APs of the VOC evaluator is defined.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from simsiam.config import MAX_IMAGE_SIZE, check_seed
from simsiam.errors import InputError

MAX_TOY_IMAGES = 20_000

# Detectron2's detectron2/data/datasets/pascal_voc.py CLASS_NAMES, in its order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


@dataclass(frozen=True)
class ToyVocSummary:
    root: Path
    images: dict[str, int]  # "VOC2007/trainval" -> count
    objects: int


def _class_colour(index: int) -> tuple[int, int, int]:
    """20 well-separated saturated colours (hues 18 degrees apart, two brightness levels)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(index / len(VOC_CLASSES), 1.0, 1.0 if index % 2 == 0 else 0.6)
    return int(r * 255), int(g * 255), int(b * 255)


def _annotation_xml(file_stem: str, folder: str, width: int, height: int, objects: list[tuple]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{file_stem}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x0, y0, x1, y1) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        # VOC boxes are 1-based and inclusive: pixel columns x0..x1-1 are xmin=x0+1 .. xmax=x1
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(value)
    return ET.tostring(root)


def _draw_image(rng: np.random.Generator, width: int, height: int, first_class: int) -> tuple[Image.Image, list]:
    pixels = rng.integers(60, 140, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    objects = []
    for k in range(int(rng.integers(1, 4))):
        cls = first_class if k == 0 else int(rng.integers(len(VOC_CLASSES)))
        w = int(rng.integers(width // 6, width // 2))
        h = int(rng.integers(height // 6, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        shape = draw.rectangle if cls % 2 == 0 else draw.ellipse
        shape((x0, y0, x0 + w - 1, y0 + h - 1), fill=_class_colour(cls))
        objects.append((VOC_CLASSES[cls], (x0, y0, x0 + w, y0 + h)))
    return image, objects


def _write_split(folder: Path, split: str, count: int, start: int, rng: np.random.Generator,
                 width: int, height: int) -> int:
    ids, objects = [], 0
    for i in range(count):
        file_stem = f"{start + i:06d}"
        image, boxes = _draw_image(rng, width, height, first_class=i % len(VOC_CLASSES))
        image.save(folder / "JPEGImages" / f"{file_stem}.jpg", quality=92)
        (folder / "Annotations" / f"{file_stem}.xml").write_bytes(
            _annotation_xml(file_stem, folder.name, width, height, boxes))
        ids.append(file_stem)
        objects += len(boxes)
    (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return objects


def make_toy_voc(root: str | os.PathLike, train_images: int = 40, test_images: int = 20,
                 width: int = 160, height: int = 120, seed: int = 0) -> ToyVocSummary:
    """Write ``root/VOCdevkit/VOC2007`` (trainval, test) and ``VOC2012`` (trainval).

    ``train_images`` go to VOC2007 trainval and half as many to VOC2012 trainval. The folder is
    built under a temporary name and renamed, so an interrupted run leaves no half dataset.
    """
    root = Path(root)
    if train_images > MAX_TOY_IMAGES or test_images > MAX_TOY_IMAGES:  # 10**9 would run until stopped
        raise InputError(f"--train-images {train_images} / --test-images {test_images}: at most {MAX_TOY_IMAGES:,} "
                         "each (a toy set; real VOC07+12 has 16,551 trainval images)")
    if train_images < 1 or test_images < len(VOC_CLASSES):
        raise InputError(f"--train-images {train_images} / --test-images {test_images}: need at least 1 training "
                         f"and {len(VOC_CLASSES)} test images (one per VOC class)")
    check_seed(seed)  # numpy's generator takes no negative seed: a traceback, and an empty folder left
    if not (32 <= width <= MAX_IMAGE_SIZE and 32 <= height <= MAX_IMAGE_SIZE):  # PIL refuses huge sides with a ValueError
        raise InputError(f"--size {width}x{height}: width and height must be from 32 to {MAX_IMAGE_SIZE}")
    target = root / "VOCdevkit"
    # before any work, and saying what to do: mkdir's own words are just "File exists" or "Not a directory"
    blocker = next((p for p in (root, *root.parents) if os.path.lexists(p)), None)
    if blocker is not None and not blocker.is_dir():
        what = "a file, not a folder" if blocker.is_file() else "not a folder"  # or a link to nothing
        where = what if blocker == root else f"{blocker} is {what}"
        raise InputError(f"{root}: {where}; give ROOT a folder to write VOCdevkit in (made if missing)")
    if os.path.lexists(target):
        raise InputError(f"{root}: already holds a VOCdevkit {'folder' if target.is_dir() else 'file'}; remove "
                         f"{target} or give another ROOT")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    staging = Path(tempfile.mkdtemp(prefix=".VOCdevkit.", dir=root))
    try:
        counts, objects, start = {}, 0, 0
        for year, splits in (("2007", (("trainval", train_images), ("test", test_images))),
                             ("2012", (("trainval", max(1, train_images // 2)),))):
            folder = staging / f"VOC{year}"
            for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
                (folder / sub).mkdir(parents=True)
            for split, count in splits:
                objects += _write_split(folder, split, count, start, rng, width, height)
                counts[f"VOC{year}/{split}"] = count
                start += count
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ToyVocSummary(root, counts, objects)
