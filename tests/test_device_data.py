"""The fast path's batch sources, run on CPU tensors: the sampler's batches, per rank and on resume;
unreadable and mixed-size images; device decoding; the auto rule; extraction's batches."""

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simsiam.augment import eval_transform
from simsiam.config import preset_config
from simsiam.data import GlobalBatchSampler, ImageDataset, make_loader, scan_images
from simsiam.device_data import (DecodedBatches, EvalBatches, InMemoryBatches, MixedImageSizes, fits_on_device,
                                 pretrain_batches)
from simsiam.device_decode import decode_batch, encoded_loader
from simsiam import gpu_augment as G
from simsiam.gpu_augment import BatchAugment
from simsiam.runtime import Runtime

from conftest import make_image_folder

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """32 labelled 16x16 JPEGs."""
    return make_image_folder(tmp_path_factory.mktemp("jpegs") / "images", classes=2, per_class=16, ext="jpg")


def collect(source, epoch: int = 0):
    source.set_epoch(epoch)
    return [(views, labels, indices) for (views, labels, indices), _ in source]


def sources(folder, kind=InMemoryBatches, batch=8, rank=0, world_size=1, seed=3):
    images = scan_images(folder)
    sampler = GlobalBatchSampler(len(images), batch, seed, rank, world_size)
    return kind(images, sampler, BatchAugment(16, blur=True), seed, CPU), sampler


def test_in_memory_batches_are_the_samplers_batches_with_two_views(jpeg_folder):
    source, sampler = sources(jpeg_folder)
    assert source.data.shape == (32, 3, 16, 16) and source.data.dtype == torch.uint8
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        expected = list(sampler)
        got = collect(source, epoch)
        assert [i.tolist() for _, _, i in got] == expected
        for (v1, v2), labels, indices in got:
            assert v1.shape == v2.shape == (8, 3, 16, 16) and not torch.equal(v1, v2)
            assert labels.tolist() == [source.images.labels[i] for i in indices.tolist()]
    assert not torch.equal(collect(source, 0)[0][0][0], collect(source, 1)[0][0][0])


def test_the_batch_sources_take_only_samplers_that_drop_the_last_batch(jpeg_folder):
    images = scan_images(jpeg_folder)
    keeping = GlobalBatchSampler(len(images), 8, 3, drop_last=False)
    with pytest.raises(ValueError, match="drops the last, incomplete batch"):
        InMemoryBatches(images, keeping, BatchAugment(16, blur=True), 3, CPU)


def test_every_image_view_step_and_epoch_draws_its_own_parameters(jpeg_folder):
    source, _ = sources(jpeg_folder, batch=8)
    seen = []
    for epoch in (0, 1):
        source.set_epoch(epoch)
        for step in (0, 1):
            first, second = source.draws(step)
            seen += [first.uniform, second.uniform]
    rows = torch.cat(seen)
    assert rows.shape == (2 * 2 * 2 * 8, G.DRAWN)
    assert len({tuple(row.tolist()) for row in rows}) == len(rows)  # no two images, views, steps or epochs share a row
    source.set_epoch(0)
    assert all(torch.equal(a.uniform, b.uniform) for a, b in zip(source.draws(1), source.draws(1)))  # reproducible
    other_seed, _ = sources(jpeg_folder, batch=8, seed=4)
    assert not torch.equal(other_seed.draws(0)[0].uniform, seen[0])


def test_two_ranks_see_the_halves_of_the_single_process_batches(jpeg_folder):
    single, _ = sources(jpeg_folder, batch=8)
    halves = [sources(jpeg_folder, batch=8, rank=r, world_size=2)[0] for r in (0, 1)]
    for epoch in (0, 1):
        whole = collect(single, epoch)
        parts = [collect(h, epoch) for h in halves]
        for step, ((views, _, indices), (a, _, ia), (b, _, ib)) in enumerate(zip(whole, *parts)):
            assert torch.equal(torch.cat([ia, ib]), indices), step
            for view, va, vb in zip(views, a, b):
                torch.testing.assert_close(torch.cat([va, vb]), view, atol=1e-6, rtol=0)


def test_a_resumed_epoch_sees_the_remaining_batches_unchanged(jpeg_folder):
    source, sampler = sources(jpeg_folder)
    sampler.set_epoch(1)
    full = collect(source, 1)
    sampler.set_epoch(1, start_step=2)
    resumed = collect(source, 1)
    assert len(resumed) == len(full) - 2
    for (views, _, indices), (expected_views, _, expected_indices) in zip(resumed, full[2:]):
        assert torch.equal(indices, expected_indices)
        assert all(torch.equal(v, e) for v, e in zip(views, expected_views))


def test_decoding_per_batch_gives_the_views_of_the_in_memory_dataset(jpeg_folder):
    in_memory, _ = sources(jpeg_folder)
    decoded, _ = sources(jpeg_folder, kind=DecodedBatches)
    for (views, _, indices), (other_views, _, other_indices) in zip(collect(in_memory, 2), collect(decoded, 2)):
        assert torch.equal(indices, other_indices)
        for v, o in zip(views, other_views):
            torch.testing.assert_close(v, o, atol=1e-5, rtol=0)


def add_broken_files(folder):
    good = sorted((folder / "class0").glob("*.jpg"))[0].read_bytes()
    (folder / "class0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "class1" / "garbage.jpg").write_bytes(b"not an image at all")
    return folder


@pytest.mark.parametrize("kind", [InMemoryBatches, DecodedBatches])
def test_unreadable_images_are_dropped_from_their_batches_and_reported(tmp_path, kind):
    folder = add_broken_files(make_image_folder(tmp_path / "imgs", classes=2, per_class=7, ext="jpg"))
    source, sampler = sources(folder, kind=kind, batch=4)
    names = lambda items: sorted(u.path.rsplit("/", 1)[1] for u in items)
    reported, seen = [], []
    source.set_epoch(0)
    for batch, unreadable in source:
        reported += unreadable
        if batch is not None:
            (v1, v2), labels, indices = batch
            assert len(v1) == len(v2) == len(labels) == len(indices) == 4 - len(unreadable)
            seen += [source.images.paths[i] for i in indices.tolist()]
    assert names(reported) == ["garbage.jpg", "truncated.jpg"]
    assert all(u.reason for u in reported)
    assert not any("truncated" in p or "garbage" in p for p in seen) and len(seen) == 14


def test_the_reason_of_an_unreadable_file_read_for_device_decoding_does_not_repeat_its_path(tmp_path):
    from simsiam.device_decode import EncodedImages

    folder = make_image_folder(tmp_path / "imgs", classes=1, per_class=1, ext="jpg")
    (folder / "class0" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "class0" / "junk.bmp").write_bytes(b"not an image at all")
    images = scan_images(folder)
    reasons = {Path(item[0].path).name: item[0].reason for item in map(EncodedImages(images).__getitem__, range(3))
               if not isinstance(item[0], torch.Tensor)}
    assert reasons == {"gone.jpg": "No such file or directory", "junk.bmp": "cannot identify image file"}


def test_decode_batch_decodes_jpegs_together_and_hands_the_rest_to_the_cpu_decoder(tmp_path):
    folder = add_broken_files(make_image_folder(tmp_path / "imgs", classes=2, per_class=2, ext="jpg"))
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(folder / "class1" / "small.png")
    frames = [Image.new("RGB", (7, 9), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "class1" / "anim.gif", save_all=True, append_images=frames[1:])  # its first frame
    # looks like a whole JPEG (start and end markers), so it reaches the batch decoder, which fails
    (folder / "class1" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 10 + b"\xff\xd9")
    images = scan_images(folder)
    [batch] = list(encoded_loader(images, batch_size=16))
    # not a JPEG, or one without its end marker: decoded by the worker, on the CPU
    assert sorted(u.path.rsplit("/", 1)[1] for u in batch.unreadable) == ["garbage.jpg", "truncated.jpg"]
    assert [p.dim() for p in batch.payloads].count(3) == 2  # the PNG and the GIF came decoded
    paths = [str(images.root / images.paths[i]) for i in batch.indices.tolist()]
    decoded, failed = decode_batch(batch.payloads, paths, CPU)
    assert [u.path.rsplit("/", 1)[1] for u in failed.values()] == ["corrupt.jpg"]
    plain = ImageDataset(images, lambda image: image)
    for j, image in enumerate(decoded):
        if j in failed:
            assert image is None and failed[j].reason
        else:
            assert torch.equal(image, plain[int(batch.indices[j])][0])


def test_a_batch_leaves_its_worker_as_one_tensor_of_jpeg_bytes(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=3, ext="jpg")
    Image.fromarray(np.zeros((9, 7, 3), np.uint8)).save(folder / "class1" / "small.png")
    images = scan_images(folder)
    [here] = list(encoded_loader(images, batch_size=16))
    [there] = list(encoded_loader(images, batch_size=16, workers=1))
    # one tensor for the six JPEGs (each tensor from a worker costs ~1 ms), the PNG decoded apart
    assert there.jpeg_bytes.dim() == 1 and len(there.decoded) == 1 and there.lengths.count(0) == 1
    assert len(there.jpeg_bytes) == sum((images.root / p).stat().st_size for p in images.paths if p.endswith(".jpg"))
    assert len(there.payloads) == 7 and all(torch.equal(a, b) for a, b in zip(here.payloads, there.payloads))


def mixed_size_folder(root):
    make_image_folder(root, classes=2, per_class=4, ext="jpg")
    Image.fromarray(np.zeros((20, 12, 3), np.uint8)).save(root / "class0" / "other_size.jpg")
    return root


def test_mixed_sizes_are_refused_when_asked_for_and_left_to_other_sources_by_auto(tmp_path):
    folder = mixed_size_folder(tmp_path / "mixed")
    images = scan_images(folder)
    sampler = GlobalBatchSampler(len(images), 4, 0)
    runtime = Runtime(CPU, "fp32")
    config = preset_config("cifar", image_size=16, data_on_gpu=True)
    with pytest.raises(MixedImageSizes, match=r"other_size.jpg: 12x20 pixels \(width x height\).*--data-on-gpu needs images of one size"):
        pretrain_batches(config, images, sampler, runtime)
    # auto never holds data on a CPU; --gpu-decode takes images of any size
    assert pretrain_batches(preset_config("cifar", image_size=16), images, sampler, runtime) is None
    source = pretrain_batches(preset_config("cifar", image_size=16, gpu_decode=True), images, sampler, runtime)
    assert isinstance(source, DecodedBatches)
    assert all(v.shape == (4, 3, 16, 16) for (views, _, _) in collect(source) for v in views)


def test_auto_holds_the_data_on_the_gpu_when_it_takes_at_most_a_quarter_of_its_memory(jpeg_folder, monkeypatch):
    images = scan_images(jpeg_folder)  # 32 images of 3x16x16 bytes: 24,576 bytes
    cuda = torch.device("cuda", 0)
    for total, expected in [(4 * 24_576, True), (4 * 24_576 - 1, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=total))
        assert fits_on_device(images, cuda) is expected
    assert not fits_on_device(images, CPU)


def test_extraction_batches_decoded_on_the_device_equal_the_plain_loaders(tmp_path):
    folder = add_broken_files(make_image_folder(tmp_path / "imgs", classes=2, per_class=5, size=24, ext="jpg"))
    Image.fromarray(np.full((30, 20, 3), 90, np.uint8)).save(folder / "class1" / "tall.png")
    images = scan_images(folder)
    plain = list(make_loader(ImageDataset(images, eval_transform(16, 20)), batch_size=4))
    ours = list(EvalBatches(images, 16, 20, CPU, batch_size=4))
    assert len(plain) == len(ours)
    for (batch, unreadable), (expected, expected_unreadable) in zip(ours, plain):
        assert sorted(u.path for u in unreadable) == sorted(u.path for u in expected_unreadable)
        if expected is None:
            assert batch is None
            continue
        for got, want in zip(batch, expected):
            assert torch.equal(got, want)


def _png16(path: Path, value: int = 150) -> None:
    """A 16-bit grayscale PNG (PIL mode I;16) of ``value`` x 256 + 77 everywhere."""
    Image.fromarray(np.full((24, 24), value * 256 + 77, np.uint16)).save(path)


def test_a_16_bit_png_is_its_8_bit_image_on_every_path(tmp_path):
    """torchvision decodes it to uint16: the fast paths stored its low byte into their uint8
    tensors (a black image), and batched it with 8-bit images into a traceback."""
    from simsiam.data import decode_rgb
    from simsiam.device_data import load_to_device

    folder = make_image_folder(tmp_path / "imgs", classes=1, per_class=3, size=24, ext="jpg")
    _png16(folder / "class0" / "deep.png")
    try:
        deep = decode_rgb(folder / "class0" / "deep.png")
    except OSError as err:  # torchvision before 0.20: "At most 8-bit PNG images are supported"
        pytest.skip(f"this torchvision does not decode 16-bit PNGs ({err}); it skips them as unreadable")
    assert deep.dtype == torch.uint8 and torch.equal(deep, torch.full((3, 24, 24), 150, dtype=torch.uint8))
    images = scan_images(folder)
    held, unreadable = load_to_device(images, CPU)
    assert not unreadable and torch.equal(held[images.paths.index("class0/deep.png")], deep)
    plain = list(make_loader(ImageDataset(images, eval_transform(16, 20)), batch_size=4))
    ours = list(EvalBatches(images, 16, 20, CPU, batch_size=4))  # the PNG beside JPEGs in one batch
    for (batch, _), (expected, _) in zip(ours, plain):
        for got, want in zip(batch, expected):
            assert torch.equal(got, want)


def test_embedding_with_device_decoded_batches_gives_the_plain_features(tmp_path):
    from retrieval.extract import embed
    from simsiam.backbones import build_resnet, pooled_backbone

    folder = add_broken_files(make_image_folder(tmp_path / "imgs", classes=2, per_class=5, size=24, ext="jpg"))
    images = scan_images(folder)
    torch.manual_seed(0)
    model = pooled_backbone(build_resnet("resnet18", cifar_stem=True))
    runtime = Runtime(CPU, "fp32")
    plain = embed(model, ImageDataset(images, eval_transform(16, 20)), runtime, batch_size=4)
    ours = embed(model, None, runtime, batches=EvalBatches(images, 16, 20, CPU, batch_size=4))
    for got, want in zip(ours, plain):
        np.testing.assert_array_equal(got, want)
    # a rank's slice, in its order
    part = list(EvalBatches(images, 16, 20, CPU, batch_size=3, indices=[7, 1, 5, 9]))
    assert [i for (batch, _) in part if batch is not None for i in batch[2].tolist()] == [7, 1, 9]  # 5: truncated.jpg


@pytest.mark.cuda(reason="the race is between CUDA streams; on a CPU there is one stream and nothing to race")
def test_gpu_decoding_never_overwrites_memory_that_queued_kernels_still_read():
    """pytorch/vision#9606's check: kernels queued on the current stream read tensors that are then
    freed; the decode that follows must not be handed (and overwrite) their blocks before they ran."""
    from torchvision.io import encode_jpeg

    device = torch.device("cuda")
    payload = encode_jpeg(torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8))
    size = 3 * 224 * 224  # the decoded image's bytes: the blocks the allocator would hand the decoder
    slow = torch.randn(4096, 4096, device=device)
    wrong = 0
    for _ in range(20):
        held = [torch.full((size,), 7, dtype=torch.uint8, device=device) for _ in range(16)]
        torch.cuda.synchronize()
        for _ in range(8):  # keeps the stream busy, so that the sums below are still queued
            slow = slow @ slow / 4096
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held  # freed while their sums are queued
        images, failed = decode_batch([payload] * 16, ["x.jpg"] * 16, device)
        torch.cuda.synchronize()
        assert not failed and all(image.shape == (3, 224, 224) for image in images)
        wrong += sum(int(s) != 7 * size for s in sums)
    assert wrong == 0


def test_gpu_decoding_runs_on_a_side_stream_that_the_current_one_waits_for(monkeypatch):
    """The order of the CUDA calls of the fix checked above on a GPU, with the CUDA API faked: the
    decode allocates on a side stream, the current stream waits for it, and each image is marked
    as used on the current stream."""
    from contextlib import contextmanager

    from simsiam import device_decode

    calls, active = [], ["current"]

    class Stream:
        def __init__(self, device=None, name="side"):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits for {other.name}")

    class Image:
        def record_stream(self, stream):
            calls.append(f"image used on {stream.name}")

    @contextmanager
    def stream(side):
        active.append(side.name)
        yield
        active.pop()

    def decode_jpeg(payloads, mode, device):
        calls.append(f"decode {len(payloads)} on {active[-1]}")
        return [Image() for _ in payloads]

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream(name="current"))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(device_decode, "decode_jpeg", decode_jpeg)
    monkeypatch.setattr(device_decode, "_SIDE_STREAMS", {})
    images = device_decode._decode_jpegs([torch.zeros(4, dtype=torch.uint8)] * 2, torch.device("cuda"))
    assert len(images) == 2
    assert calls == ["decode 2 on side", "current waits for side", "image used on current", "image used on current"]


def test_running_out_of_device_memory_while_decoding_is_not_taken_for_a_bad_file(monkeypatch):
    # an OutOfMemoryError is a RuntimeError, as nvjpeg's decoding errors: it was caught, and the
    # batch decoded again one image at a time, then on the CPU
    from simsiam import device_decode

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(device_decode, "decode_jpeg", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decode_batch([torch.zeros(8, dtype=torch.uint8)], ["x.jpg"], CPU)
