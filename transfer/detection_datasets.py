"""VOC and COCO from ``--data-root``: where their folders are, checked before anything starts.

Detectron2 registers its builtin dataset names (``voc_2007_trainval``, ``coco_2017_train``, ...)
under ``$DETECTRON2_DATASETS`` (default ``./datasets``) when it is imported. ``simsiam detect``
registers the same names again under ``--data-root``, through Detectron2's public catalog API, so
that configs written for Detectron2 or MoCo run unchanged. The layouts accepted, below
``--data-root``:

- VOC: ``VOCdevkit/VOC2007`` and ``VOCdevkit/VOC2012`` (or ``VOC2007``, ``VOC2012`` directly),
  each with ``Annotations/``, ``JPEGImages/`` and ``ImageSets/Main/{split}.txt``;
- COCO: ``annotations/instances_{train,val}2017.json``, ``train2017/``, ``val2017/`` (or the
  same inside ``coco/``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from simsiam.errors import InputError

_VOC_NAME = re.compile(r"^voc_(2007|2012)_(train|val|trainval|test)$")
_COCO_NAME = re.compile(r"^coco_2017_(train|val)$")
VOC_LAYOUT = "VOCdevkit/VOC2007, VOCdevkit/VOC2012"
COCO_LAYOUT = "annotations/, train2017/, val2017/"


@dataclass(frozen=True)
class DatasetLocation:
    """Where one Detectron2 dataset name lives under ``--data-root``."""

    name: str
    kind: str  # "voc" or "coco"
    folder: Path  # VOC: the VOC2007/VOC2012 folder; COCO: the image folder
    split: str
    year: int = 0  # VOC only
    annotations: Path | None = None  # COCO only: the instances JSON


def _voc_folder(root: Path, year: str) -> Path | None:
    for candidate in (root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}"):
        if candidate.is_dir():
            return candidate
    return None


def _coco_folder(root: Path) -> Path | None:
    for candidate in (root, root / "coco"):
        if (candidate / "annotations").is_dir():
            return candidate
    return None


def check_data_root(data_root: str | os.PathLike) -> Path:
    """A first check that needs no Detectron2: ``--data-root`` holds VOC or COCO folders."""
    root = Path(data_root)
    if not root.is_dir():
        raise InputError(f"--data-root {root}: no such folder")
    if not (_voc_folder(root, "2007") or _voc_folder(root, "2012") or _coco_folder(root)):
        raise InputError(f"--data-root {root}: holds neither VOC ({VOC_LAYOUT}) nor COCO ({COCO_LAYOUT}) folders")
    return root


def _missing(root: Path, paths: Iterable[Path]) -> list[str]:
    return [os.path.relpath(p, root) for p in paths if not p.exists()]


def locate_dataset(data_root: str | os.PathLike, name: str) -> DatasetLocation:
    """Where dataset ``name`` is under ``data_root``; every file it needs is checked to exist."""
    root = Path(data_root)
    voc = _VOC_NAME.match(name)
    if voc:
        year, split = voc.groups()
        folder = _voc_folder(root, year)
        if folder is None:
            raise InputError(f"--data-root {root}: no VOCdevkit/VOC{year} folder, needed for {name}")
        missing = _missing(root, (folder / "Annotations", folder / "JPEGImages",
                                  folder / "ImageSets" / "Main" / f"{split}.txt"))
        if missing:
            raise InputError(f"--data-root {root}: {name} needs {', '.join(missing)}")
        _check_voc_split(root, folder, split, name)
        return DatasetLocation(name, "voc", folder, split, year=int(year))
    coco = _COCO_NAME.match(name)
    if coco:
        split = coco.group(1)
        base = _coco_folder(root) or root
        images, annotations = base / f"{split}2017", base / "annotations" / f"instances_{split}2017.json"
        missing = _missing(root, (annotations, images))
        if missing:
            raise InputError(f"--data-root {root}: {name} needs {', '.join(missing)}")
        return DatasetLocation(name, "coco", images, split, annotations=annotations)
    raise InputError(f"dataset {name}: simsiam detect registers voc_<2007|2012>_<train|val|trainval|test> and "
                     "coco_2017_<train|val> from --data-root; use one of those in DATASETS.TRAIN/TEST")


def _check_voc_split(root: Path, folder: Path, split: str, name: str) -> None:
    """Every image the split lists has its JPEG and its XML, and it lists one at least: Detectron2
    fails on an empty split with an AssertionError, and on a missing file inside a loader worker
    with a message that no longer names it. (A stat per image: a second for VOC's 16k.)"""
    listed = folder / "ImageSets" / "Main" / f"{split}.txt"
    try:
        ids = [line.split()[0] for line in listed.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--data-root {root}: cannot read {os.path.relpath(listed, root)} ({err})") from None
    if not ids:
        raise InputError(f"--data-root {root}: {os.path.relpath(listed, root)} lists no images, so {name} is empty")
    for image_id in ids:
        missing = _missing(root, (folder / "JPEGImages" / f"{image_id}.jpg", folder / "Annotations" / f"{image_id}.xml"))
        if missing:
            raise InputError(f"--data-root {root}: {name} lists {image_id} ({os.path.relpath(listed, root)}), "
                             f"but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")


def locate_datasets(data_root: str | os.PathLike, names: Iterable[str]) -> list[DatasetLocation]:
    return [locate_dataset(data_root, name) for name in dict.fromkeys(names)]


def register_datasets(locations: Iterable[DatasetLocation]) -> None:
    """Register each dataset with Detectron2 under its builtin name, replacing the builtin entry."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances, register_pascal_voc

    for where in locations:
        if where.name in DatasetCatalog.list():
            DatasetCatalog.remove(where.name)
        if where.name in MetadataCatalog.list():
            MetadataCatalog.remove(where.name)
        if where.kind == "voc":
            register_pascal_voc(where.name, str(where.folder), where.split, where.year)
            MetadataCatalog.get(where.name).set(evaluator_type="pascal_voc")
        else:
            register_coco_instances(where.name, {}, str(where.annotations), str(where.folder))
