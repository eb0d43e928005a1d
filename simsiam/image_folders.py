"""The images of a folder: which files are images, in what order, with which labels.

No torch here: the commands that only read feature files (knn, search) use these names and
warnings without loading torch's image libraries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import InputError, given_as

# torchvision's ImageFolder's (IMG_EXTENSIONS), and GIF
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageList:
    """The images of a folder: ``paths`` relative to ``root``, ``labels`` index ``classes`` (-1: none)."""

    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]
    loose: int = 0  # images lying directly in ``root``, left out because it has class folders

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def fingerprint(self) -> dict:
        """The count and a sha256 of the paths relative to ``root``, in order: what a resumed run
        compares, since the sampler draws image indices (the same for the folder moved or renamed;
        0.13 s for ImageNet's 1.28M paths)."""
        digest = hashlib.sha256("\0".join(self.paths).encode("utf-8", "surrogateescape"))  # no path holds a NUL
        return {"count": len(self.paths), "sha256": digest.hexdigest()}


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _images_below(root: Path, name: str) -> list[str]:
    """The images under the folder ``root/name``, as paths relative to ``root``, following links to
    folders (as torchvision's ImageFolder) but not a link to a folder it is already inside, which
    would loop for ever. Only links can loop, so only they are resolved."""
    def unreadable(err: OSError):  # os.walk would skip the folder, and its images, silently
        raise InputError(f"{err.filename}: cannot list this folder ({err.strerror})")

    found = []
    for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True, onerror=unreadable):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        if links:
            here = os.path.realpath(dirpath)
            loops = {d for d in links if _is_within(here, os.path.realpath(os.path.join(dirpath, d)))}
            dirnames[:] = [d for d in dirnames if d not in loops]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden, as hidden files and classes
        # relative once a folder: os.path.relpath of each file was 84 % of a 50,000-image scan
        relative = os.path.relpath(dirpath, root)
        found += [os.path.join(relative, f) for f in sorted(filenames) if is_image_name(f)]
    return found


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def same_images(root_a: str | os.PathLike, paths_a, root_b: str | os.PathLike, paths_b) -> bool:
    """Whether two lists are the same images: the same paths under the same folder, however spelled."""
    return list(paths_a) == list(paths_b) and os.path.realpath(root_a) == os.path.realpath(root_b)


def scan_images(root: str | os.PathLike) -> ImageList:
    """List the images of ``root``: an ImageFolder (``class/**/*.jpg``) or a flat folder of images.

    Class folders win when there are any (as torchvision's ImageFolder, images lying directly in
    ``root`` are then ignored); classes are the sorted folder names that hold images.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for name in class_dirs:
        files = _images_below(root, name)
        if files:
            paths += files
            labels += [len(classes)] * len(files)
            classes.append(name)
    top_level = sorted(e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name))
    if not paths:
        paths, labels = top_level, [-1] * len(top_level)
    if not paths:
        raise InputError(f"{root}: no images found (expected class/*.jpg folders or image files)")
    return ImageList(root=root, paths=paths, labels=labels, classes=classes, loose=len(top_level) if classes else 0)


# folder names of dataset splits: a dataset's top folder scanned as an ImageFolder has them as classes
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "eval"})


def split_folders_warning(where: str, root: str | os.PathLike, classes: Sequence[str]) -> str | None:
    """A warning when every class folder of ``root`` is named like a dataset split (``train/``,
    ``test/``): the dataset's top folder was given, so each image's label would be its split, not
    its class. ``where`` starts the message: the option and what the user gave."""
    if len(classes) < 2 or not all(c.lower() in SPLIT_NAMES for c in classes):
        return None
    folders = "its class folders" if where.endswith(str(root)) else f"the class folders of {root}"
    return (f"{where}: {folders} ({', '.join(classes)}) are dataset splits, so the labels are the splits, not "
            f"classes; did you mean a split's folder ({Path(root) / classes[-1]})?")


def unicode_form_hint(unknown: Sequence[str], known: Sequence[str]) -> str:
    """A note for class names that differ from known ones only in their Unicode form (``café`` as
    one code point or as e + a combining accent: a folder copied from macOS), which look the same."""
    forms = {unicodedata.normalize("NFC", name): name for name in known}
    twins = [name for name in unknown if unicodedata.normalize("NFC", name) in forms]
    if not twins:
        return ""
    return (f" ({twins[0]!r} is {forms[unicodedata.normalize('NFC', twins[0])]!r} written in another Unicode form, "
            "as a folder copied from macOS may be: rename one of the two)")


# a classifier's accuracy with one class (kNN, lincls): every image gets it, whatever the features
ONE_CLASS_WARNING = "{} has one class: every image is classified as it, so the accuracy is 100 % whatever the features"


def folder_warnings(where: str, images: ImageList, labels_used: bool = True) -> list[str]:
    """What may be wrong with a scanned folder, worth a warning before it is used: class folders
    named like dataset splits, when the labels are used (:func:`split_folders_warning`); images
    lying beside class folders (left out, as torchvision's ImageFolder leaves them). ``where``
    starts each message."""
    warnings = [split_folders_warning(where, images.root, images.classes) if labels_used else None]
    if images.loose:
        folders = ", ".join(images.classes[:3]) + (f" and {len(images.classes) - 3} more" if len(images.classes) > 3 else "")
        warnings.append(f"{where}: {images.loose} image(s) lying directly in it are left out: it has class folders "
                        f"({folders}), and only the images inside them are read (class/*.jpg)")
    return [warning for warning in warnings if warning]


def labelled_images(train_dir: str, val_dir: str, train_option: str, val_option: str) -> tuple[ImageList, ImageList]:
    """Both folders as ImageFolders, the validation labels indexing the training classes (matched by
    name, so a validation folder may hold some of the classes, in any order)."""
    with given_as(train_option, train_dir):  # two folders: the message says which
        train = scan_images(train_dir)
    with given_as(val_option, val_dir):
        val = scan_images(val_dir)
    for option, images in ((train_option, train), (val_option, val)):
        if not images.labelled:
            raise InputError(f"{option} {images.root}: needs class folders (class/*.jpg) for labels")
    unknown = [c for c in val.classes if c not in train.classes]
    if unknown:
        raise InputError(f"{val_option} {val.root}: classes not in {train_option}: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                         + unicode_form_hint(unknown, train.classes))
    index = {c: i for i, c in enumerate(train.classes)}
    labels = [index[val.classes[label]] for label in val.labels]
    return train, dataclasses.replace(val, labels=labels, classes=train.classes)
