"""The data pipeline: folder scanning, decoding, unreadable images, deterministic batches."""

from pathlib import Path

import numpy as np
import pytest
import torch

from simsiam.augment import TwoViews, eval_transform, pretrain_transform
from simsiam.data import (GlobalBatchSampler, ImageDataset, Unreadable, collate_readable, decode_rgb,
                          make_loader, scan_images)
from simsiam.errors import InputError

from conftest import make_image_folder


def test_scan_imagefolder_and_flat_folder(tmp_path):
    labelled = scan_images(make_image_folder(tmp_path / "a", classes=3, per_class=2))
    assert labelled.classes == ["class0", "class1", "class2"]
    assert labelled.labels == [0, 0, 1, 1, 2, 2]
    assert labelled.paths[0] == "class0/c0_000.png"
    flat = scan_images(make_image_folder(tmp_path / "b", classes=2, per_class=2, labelled=False))
    assert flat.classes == [] and flat.labels == [-1] * 4 and not flat.labelled
    assert flat.paths == ["c0_000.png", "c0_001.png", "c1_000.png", "c1_001.png"]


def test_missing_empty_and_not_a_folder_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="nope: no such folder"):
        scan_images(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="empty: no images found"):
        scan_images(tmp_path / "empty")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not a folder"):
        scan_images(tmp_path / "file.jpg")


def test_links_to_folders_are_followed_but_never_round_a_loop(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "a", classes=2, per_class=2)
    (root / "class0" / "up").symlink_to("..")  # would walk a, a/class0, a/class0/up/class0, ... for ever
    (root / "class0" / "self").symlink_to(".")  # would list class0's images again and again
    (root / "class1" / "sibling").symlink_to("../class0")  # a real second view of class0's images
    expected = ["class0/c0_000.png", "class0/c0_001.png", "class1/c1_000.png", "class1/c1_001.png",
                "class1/sibling/c0_000.png", "class1/sibling/c0_001.png"]
    assert scan_images(root).paths == expected
    monkeypatch.chdir(root)  # the same folder spelled "."
    assert scan_images(".").paths == expected
    # and other spellings: paths are relative to the folder, whatever leads to it
    monkeypatch.chdir(root / "class1")
    for spelling in ("..", "../", "../../a", f"{tmp_path}//a/./"):
        assert scan_images(spelling).paths == expected, spelling


def test_a_folder_that_cannot_be_listed_is_an_error_not_skipped(tmp_path, monkeypatch):
    import os

    root = make_image_folder(tmp_path / "a", classes=2, per_class=2)
    listing = os.scandir

    def refused(path="."):  # as chmod 000 does to a non-root user (the tests may run as root)
        if Path(path) == root / "class1":
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(InputError, match="class1: cannot list this folder .Permission denied"):
        scan_images(root)


def test_unreadable_and_truncated_images_are_reported_not_raised(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=1, per_class=3, ext="jpg")
    good = sorted((root / "class0").iterdir())
    data = good[0].read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "class0" / "garbage.png").write_bytes(b"this is not an image")
    with pytest.raises(OSError, match="truncated"):
        decode_rgb(root / "class0" / "truncated.jpg")
    assert decode_rgb(good[0]).shape == (3, 16, 16) and decode_rgb(good[0]).dtype == torch.uint8

    dataset = ImageDataset(scan_images(root), eval_transform(16, None))
    batch, unreadable = collate_readable([dataset[i] for i in range(len(dataset))])
    assert sorted(u.path.rsplit("/", 1)[1] for u in unreadable) == ["garbage.png", "truncated.jpg"]
    assert all(isinstance(u, Unreadable) and u.reason for u in unreadable)
    images, labels, indices = batch
    assert images.shape == (3, 3, 16, 16)


def test_an_image_whose_name_is_not_utf8_decodes(tmp_path):
    """A Linux file name is any bytes; os.walk gives them surrogate-escaped, which torch.from_file refused."""
    import os

    root = make_image_folder(tmp_path / "imgs", classes=1, per_class=1, ext="jpg")
    [good] = (root / "class0").iterdir()
    odd = os.fsdecode(os.fsencode(root / "class0") + b"/\xff.jpg")
    Path(odd).write_bytes(good.read_bytes())
    assert torch.equal(decode_rgb(odd), decode_rgb(good))
    dataset = ImageDataset(scan_images(root), eval_transform(16, None))
    batch, unreadable = collate_readable([dataset[i] for i in range(len(dataset))])
    assert not unreadable and batch[0].shape == (2, 3, 16, 16)


def test_an_image_under_another_formats_extension_is_read_by_its_content(tmp_path):
    """A BMP named .jpg, a TIFF named .png: torchvision's decoders reject them, PIL (as ImageFolder) reads them."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    expected = torch.from_numpy(pixels).permute(2, 0, 1)
    for name, format in (("bmp.jpg", "BMP"), ("tiff.png", "TIFF"), ("tiff.jpeg", "TIFF")):
        Image.fromarray(pixels).save(tmp_path / name, format=format)
        assert torch.equal(decode_rgb(tmp_path / name), expected), name
    (tmp_path / "text.jpg").write_bytes(b"this is not an image")
    with pytest.raises(OSError, match="cannot identify image file"):
        decode_rgb(tmp_path / "text.jpg")


def test_a_16_bit_tiff_keeps_its_top_8_bits_not_clipped_white(tmp_path):
    from PIL import Image

    deep = np.linspace(0, 65535, 400).reshape(20, 20).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    # a 16-bit PGM, written out (Pillow 9.3 cannot save one); opened as "I" by Pillow 13
    (tmp_path / "deep.pgm").write_bytes(b"P5\n20 20\n65535\n" + deep.astype(">u2").tobytes())
    Image.fromarray(deep.astype(np.int32)).save(tmp_path / "int32.tif")  # "I"
    with Image.open(tmp_path / "deep.tif") as image:
        assert image.mode.startswith("I;16")
    for name in ("deep.tif", "deep.pgm", "int32.tif"):
        decoded = decode_rgb(tmp_path / name)
        assert decoded.shape == (3, 20, 20) and decoded.dtype == torch.uint8
        assert torch.equal(decoded, torch.from_numpy((deep >> 8).astype(np.uint8)).expand(3, -1, -1)), name
    # 8-bit values in an "I" image are taken as they are
    low = (deep >> 8).astype(np.int32)
    Image.fromarray(low).save(tmp_path / "low.tif")
    assert torch.equal(decode_rgb(tmp_path / "low.tif"), torch.from_numpy(low.astype(np.uint8)).expand(3, -1, -1))


def test_a_cut_png_gives_the_decoders_reason_without_its_source_location(tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError) as raised:
        decode_rgb(tmp_path / "cut.png")
    assert ".cpp" not in str(raised.value) and "operator()" not in str(raised.value), raised.value


@pytest.mark.parametrize("where", ["IDAT", "IEND"])
def test_a_png_with_a_corrupt_byte_is_unreadable_not_a_crash(tmp_path, where):
    """torchvision 0.29's PNG decoder killed the process (SIGSEGV) on a bad IDAT checksum: every
    command that read such a file died without a word. PIL reads PNGs and says why."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(5).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = bytearray((tmp_path / "a.png").read_bytes())
    data[data.find(where.encode()) + (14 if where == "IDAT" else -3)] ^= 0xFF  # pixel data; IEND's length
    for name in ("bitrot.png", "bitrot.jpg", "bitrot.webp"):  # under another name, torchvision took it by content
        (tmp_path / name).write_bytes(bytes(data))
        if where == "IDAT":
            with pytest.raises(OSError, match="broken data stream"):
                decode_rgb(tmp_path / name)
        else:  # a byte PIL does not read (IEND's length): the pixels are whole
            assert decode_rgb(tmp_path / name).shape == (3, 24, 30)


def test_an_animated_webp_is_its_first_frame(tmp_path):
    from PIL import Image, features

    if not features.check("webp"):
        pytest.skip("this Pillow was built without WebP")
    frames = [Image.new("RGB", (12, 10), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    decoded = decode_rgb(tmp_path / "anim.webp")  # torchvision: "Animated webp files are not supported"
    assert decoded.shape == (3, 10, 12) and decoded[0].float().mean() > 250 and decoded[1].float().mean() < 5


def animated_gif(path: Path) -> Path:
    """Three frames of different colours; PIL (and every image viewer) shows the first."""
    from PIL import Image

    frames = [Image.new("RGB", (12, 10), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def test_an_animated_gif_is_its_first_frame(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "imgs", classes=1, per_class=2, size=12)
    gif = animated_gif(root / "class0" / "anim.gif")
    with Image.open(gif) as image:
        expected = torch.from_numpy(__import__("numpy").array(image.convert("RGB"))).permute(2, 0, 1)
    decoded = decode_rgb(gif)
    assert decoded.shape == (3, 10, 12) and torch.equal(decoded, expected) and decoded[0].float().mean() > 200
    # and it batches with the other images (a [frames, 3, H, W] tensor made collation fail)
    dataset = ImageDataset(scan_images(root), eval_transform(8, None))
    batch, unreadable = collate_readable([dataset[i] for i in range(len(dataset))])
    assert not unreadable and batch[0].shape == (3, 3, 8, 8)


def test_augmentation_depends_only_on_seed_epoch_and_index(shared_image_folder):
    images = scan_images(shared_image_folder)
    dataset = ImageDataset(images, TwoViews(pretrain_transform(16)), seed=7)
    a1, a2 = dataset[3][0]
    torch.rand(10)  # whatever else consumes the global generator does not matter
    b1, b2 = dataset[3][0]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # the two views are different draws
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0][0], a1)


def test_global_batches_split_across_ranks_as_one_process_sees_them():
    single = GlobalBatchSampler(40, 8, seed=3)
    ranks = [GlobalBatchSampler(40, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    for whole, left, right in zip(single, *ranks):
        assert whole == left + right and len(left) == 4
    assert len(single) == 5
    single.set_epoch(2, start_step=3)
    assert len(single) == 2
    full = GlobalBatchSampler(40, 8, seed=3)
    full.set_epoch(2)
    assert list(single) == list(full)[3:]
    full.set_epoch(3)
    assert list(full) != list(single)


def test_without_drop_last_the_last_batch_is_kept_and_shared_equally_by_the_ranks():
    single = GlobalBatchSampler(42, 8, seed=3, drop_last=False)
    single.set_epoch(1)
    batches = list(single)
    assert len(batches) == single.steps_per_epoch == 6 and [len(b) for b in batches] == [8] * 5 + [2]
    assert sorted(sum(batches, [])) == list(range(42))  # every image once, as main_lincls.py's loader
    ranks = [GlobalBatchSampler(42, 8, seed=3, rank=r, world_size=4, drop_last=False) for r in range(4)]
    parts = []
    for sampler in ranks:
        sampler.set_epoch(1)
        parts.append(list(sampler))
    for step in range(5):  # the full batches: the single process's, a quarter each
        assert sum((part[step] for part in parts), []) == batches[step]
    # the last: one image each, its 2 images and 2 more from the start of the epoch's order
    assert [len(part[-1]) for part in parts] == [1, 1, 1, 1]
    assert sum((part[-1] for part in parts), []) == batches[-1] + batches[0][:2]
    resumed = GlobalBatchSampler(42, 8, seed=3, drop_last=False)
    resumed.set_epoch(1, start_step=5)
    assert list(resumed) == batches[5:]


def test_batch_sampler_refuses_impossible_sizes():
    with pytest.raises(InputError, match="--batch-size 64: larger than the dataset \\(10 images\\)"):
        GlobalBatchSampler(10, 64, seed=0)
    with pytest.raises(InputError, match="not divisible by the 4 processes"):
        GlobalBatchSampler(100, 10, seed=0, world_size=4)


def test_loader_with_workers_gives_the_same_batches_as_without(shared_image_folder):
    images = scan_images(shared_image_folder)
    dataset = ImageDataset(images, TwoViews(pretrain_transform(16)), seed=1)
    sampler = GlobalBatchSampler(len(images), 16, seed=1)
    runs = []
    for workers in (0, 2):
        batches = [b for b, _ in make_loader(dataset, sampler, workers=workers)]
        runs.append(batches)
    for (v0, y0, i0), (v1, y1, i1) in zip(*runs):
        assert torch.equal(i0, i1) and torch.equal(v0[0], v1[0]) and torch.equal(v0[1], v1[1])


def test_a_worker_stays_quiet_about_a_broken_pipe_to_the_main_process_only():
    """What the DataLoader workers run first (in a fresh process: it changes process-wide hooks)."""
    import subprocess
    import sys

    script = """
import multiprocessing.queues, signal, sys
from simsiam.data import _quiet_when_the_main_process_stops
signal.signal(signal.SIGTERM, lambda *a: None)
_quiet_when_the_main_process_stops(0)
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
for error in (BrokenPipeError(), ConnectionResetError(), EOFError()):  # EOFError: resource_sharer's conn.recv
    multiprocessing.queues.Queue._on_queue_feeder_error(error, None)
    sys.excepthook(type(error), error, None)
try:
    raise ValueError("a real error")
except ValueError as error:
    multiprocessing.queues.Queue._on_queue_feeder_error(error, None)
    sys.excepthook(type(error), error, error.__traceback__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("ValueError: a real error") == 2 and "BrokenPipe" not in done.stderr
    assert "ConnectionReset" not in done.stderr and "EOFError" not in done.stderr


def test_class_folders_named_like_dataset_splits_are_warned_about():
    """A dataset's top folder given for its split (DATA holding train/ and test/): every label is a split."""
    from simsiam.data import split_folders_warning

    warning = split_folders_warning("DATA /d", "/d", ["test", "Train"])
    assert warning == ("DATA /d: its class folders (test, Train) are dataset splits, so the labels are the splits, "
                       "not classes; did you mean a split's folder (/d/Train)?")
    assert "the class folders of /d (train, val)" in split_folders_warning("--train f.h5", "/d", ["train", "val"])
    assert split_folders_warning("DATA /d", "/d", ["cat", "train"]) is None  # one class that happens to be named so
    assert split_folders_warning("DATA /d", "/d", ["train"]) is None  # one class: nothing to confuse
    assert split_folders_warning("DATA /d", "/d", []) is None  # a flat folder


def test_images_beside_class_folders_are_counted_and_warned_about(tmp_path):
    """Left out, as torchvision's ImageFolder leaves them: silently, a folder of 1,000 images with one
    small subfolder trained on the subfolder alone."""
    from cli_runner import assert_user_error, run
    from simsiam.data import folder_warnings, scan_images

    data = make_image_folder(tmp_path / "data", classes=1, per_class=3, labelled=False)  # 3 loose images
    make_image_folder(data / "extra", classes=1, per_class=1, labelled=False)
    images = scan_images(data)
    assert (len(images), images.classes, images.loose) == (1, ["extra"], 3)
    warning = (f"DATA {data}: 3 image(s) lying directly in it are left out: it has class folders (extra), and only "
               "the images inside them are read (class/*.jpg)")
    assert folder_warnings(f"DATA {data}", images) == [warning]
    assert scan_images(data / "extra").loose == 0  # a flat folder: they are its images
    assert folder_warnings("DATA /d", scan_images(make_image_folder(tmp_path / "classes", classes=2, per_class=1))) == []
    # said before the refusal it explains
    result = run("pretrain", data, "--out", tmp_path / "run", "--preset", "cifar", "--batch-size", "2", "--device", "cpu")
    assert result.output.splitlines()[0] == f"warning: {warning}"
    assert result.output.splitlines()[1] == "Error: --batch-size 2: larger than the dataset (1 image)"
    assert_user_error(result, only_line=False)


def test_a_broken_gif_says_what_giflib_found_not_its_error_number(tmp_path):
    """torchvision reports giflib's errors as "DGifSlurp() failed - 102": the code is said in words."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "GIF")
    (tmp_path / "cut.gif").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "other.gif").write_bytes(b"GIF89a" + bytes(5))
    with pytest.raises(OSError, match=r"^GIF: reading failed \(a truncated file\?\)$"):
        decode_rgb(tmp_path / "cut.gif")
    with pytest.raises(OSError, match="^GIF: not a GIF file$"):
        decode_rgb(tmp_path / "other.gif")


def test_hidden_folders_inside_a_class_are_left_out_as_hidden_files_and_classes(tmp_path):
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=2, size=8)
    for hidden in (root / "class0" / ".thumbs", root / ".cache"):
        make_image_folder(hidden, classes=1, per_class=2, size=8)  # images below, as a viewer's cache holds
    make_image_folder(root / "class1" / "more", classes=1, per_class=1, size=8, ext="pgm")  # torchvision's .pgm too
    images = scan_images(root)
    assert images.classes == ["class0", "class1"]
    assert not any("/." in "/" + p for p in images.paths) and len(images.paths) == 5
    assert any(p.endswith(".pgm") for p in images.paths)
