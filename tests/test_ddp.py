"""DDP: two gloo processes on CPU train as one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from simsiam.checkpoint import from_official_layout, load_checkpoint
from simsiam.config import PretrainConfig
from simsiam.runtime import start
from simsiam.train import KnnMonitor, build_model

REPO = Path(__file__).resolve().parents[1]
# The CIFAR stem has no max-pool: with one, float noise of 1e-7 can flip which of two equal
# pixels a window keeps (our synthetic images have flat squares), and the runs drift apart.
ARGS = ["--preset", "cifar", "--image-size", "8", "--dim", "64", "--pred-dim", "16", "--batch-size", "16",
        "--epochs", "2", "--workers", "0", "--device", "cpu", "--seed", "5", "--log-every", "1"]


def pretrain(*args, processes: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, "-m", "cli", "pretrain", *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, shared_image_folder):
    # The kNN monitor too: each rank embeds every second image, rank 0 scores the gathered rows.
    # Its validation images are new ones (an odd count, so the ranks' shares differ in size).
    val = make_image_folder(tmp_path / "val", classes=2, per_class=13, seed=9)
    monitor = ["--knn-train", shared_image_folder, "--knn-val", val, "--knn-k", "5"]
    pretrain(shared_image_folder, "--out", tmp_path / "single", *ARGS, *monitor)
    pretrain(shared_image_folder, "--out", tmp_path / "ddp", *ARGS, *monitor, processes=2)
    single = load_checkpoint(tmp_path / "single" / "last.pth.tar")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pth.tar")
    assert ddp["global_step"] == single["global_step"] == 8
    assert ddp["state_dict"].keys() == single["state_dict"].keys()

    # Each rank holds half of every global batch (the sampler gives rank r its slice), DDP
    # averages the gradients, and SyncBN (CPUSyncBatchNorm under gloo) normalises with the
    # statistics of the whole global batch. So the two runs compute the same function and differ
    # only in the order of float additions (per-rank sums, then an all-reduce). The first two
    # losses (the initial weights, then after one update) agree to 3e-8. Later steps amplify that
    # rounding by how the synthetic images' flat squares happen to be cropped: the weights of the
    # last step differed by 5e-5 of a tensor's scale with torch 2.14 and by 5e-3 with torch 2.4
    # and 2.6, the same seed (another seed: 2e-4). 2e-2 bounds that, while per-rank BN
    # statistics (no SyncBN) move the weights by 2e-1 of their scale here, a wrong batch split
    # more. The exact check of the update is test_ddp_steps_give_the_weights_of_one_process.
    worst = 0.0
    for key, a in single["state_dict"].items():
        b = ddp["state_dict"][key]
        if a.is_floating_point():
            scale = a.abs().max().clamp_min(1e-2)  # running means near 0 have no relative scale
            worst = max(worst, ((a - b).abs().max() / scale).item())
        else:
            assert torch.equal(a, b), key
    assert worst < 2e-2, worst
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("single", "ddp")]
    assert len(lines[0]) == len(lines[1])
    first_losses = [[json.loads(line)["loss"] for line in run if json.loads(line)["kind"] == "step"][:2]
                    for run in lines]
    assert first_losses[0] == pytest.approx(first_losses[1], rel=0, abs=1e-6)
    # the collapse monitor is the global batch's too, not rank 0's half (1.015 against 1.001 here)
    first_stds = [[json.loads(line)["collapse_std"] for line in run if json.loads(line)["kind"] == "step"][0]
                  for run in lines]
    assert first_stds[0] == pytest.approx(first_stds[1], rel=1e-4)

    # The sharded monitor scores what one process scores on the same weights: the DDP run's last
    # checkpoint, evaluated here by one process over all images.
    epochs = [json.loads(line) for line in lines[1] if json.loads(line)["kind"] == "epoch"]
    config = PretrainConfig.from_dict(ddp["config"])
    model = build_model(config)
    model.load_state_dict(from_official_layout(ddp["state_dict"]))
    alone = KnnMonitor(config, start("cpu", "fp32"))(model.encoder)
    assert epochs[-1]["knn_top1"] == alone


def _tiny_simsiam():
    from simsiam.backbones import build_resnet
    from simsiam.model import SimSiam

    torch.manual_seed(0)
    return SimSiam(build_resnet("resnet18", num_classes=64, zero_init_residual=True, cifar_stem=True), 64, 16)


def _sgd_steps(model, params, steps: int, share: slice = slice(None)) -> None:
    """``steps`` SimSiam steps of SGD with momentum and weight decay over ``params``, on fixed
    random batches of 16 (``share``: a rank's rows of each)."""
    from simsiam.loss import negative_cosine_similarity

    optimizer = torch.optim.SGD(params, 0.05, momentum=0.9, weight_decay=5e-4)
    for step in range(steps):
        views = torch.rand(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(step))[:, share]
        loss = negative_cosine_similarity(*model(views[0], views[1]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _ddp_rank(rank: int, port: int, steps: int, out: str) -> None:
    import torch.distributed as dist

    from simsiam.runtime import Runtime, data_parallel, sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    runtime = Runtime(torch.device("cpu"), "fp32", rank, 2, rank)
    raw = sync_batchnorm(_tiny_simsiam(), runtime)
    _sgd_steps(data_parallel(raw, runtime), raw.parameters(), steps, slice(8 * rank, 8 * rank + 8))
    if rank == 0:
        torch.save(raw.state_dict(), out)
    dist.destroy_process_group()


def test_ddp_steps_give_the_weights_of_one_process(tmp_path):
    """DDP with CPUSyncBatchNorm, each rank on half of every batch, against one process on the
    whole batches: four SGD steps with momentum on random images (no flat regions that amplify
    rounding), so only the order of float additions differs (measured: 4e-6 of a tensor's
    scale, torch 2.6 and 2.14). Per-rank BN statistics or a gradient not averaged move the
    weights by far more."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, 4, str(tmp_path / "ddp.pt")), nprocs=2)
    single = _tiny_simsiam()
    _sgd_steps(single, single.parameters(), 4)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for key, a in single.state_dict().items():
        if a.is_floating_point():
            assert (a - ddp[key]).abs().max() / a.abs().max().clamp_min(1e-2) < 1e-4, key
        else:
            assert torch.equal(a, ddp[key]), key


@pytest.mark.slow
def test_every_rank_stops_when_the_run_folder_is_locked_by_another_run(tmp_path, shared_image_folder):
    from simsiam.run_dir import locked_run_dir

    out = tmp_path / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with locked_run_dir(out):  # another run writing there
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "cli", "pretrain", str(shared_image_folder), "--out", str(out), *ARGS],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    # every rank stops (none waits for the others in a barrier until the launcher kills it); rank 0 says why, once
    assert result.stderr.count("another simsiam run is writing in this folder") == 1, result.stdout + result.stderr


def agree_as(rank: int, messages: list, monkeypatch, error=None):
    """``agree`` on ``rank`` of ``len(messages)`` processes, the others' outcomes given (None: no error),
    the all-gather faked: what it raises there."""
    import simsiam.runtime as rt
    from simsiam.errors import InputError

    def all_gather_object(output, value):
        assert value == (None if error is None else str(error))  # this process's outcome is what it sends
        output[:] = [value if r == rank else m for r, m in enumerate(messages)]

    monkeypatch.setattr(rt.dist, "all_gather_object", all_gather_object)
    runtime = rt.Runtime(torch.device("cpu"), "fp32", rank, len(messages))
    try:
        with rt.agreement(runtime):
            if error is not None:
                raise error
    except InputError as err:
        return err
    return None


def test_the_processes_wait_for_each_other_before_ending_their_group_only_when_all_end_there(monkeypatch):
    # one tearing the group down while another still works or has left can hang (seen with torch
    # 2.4, after a finished command and after an agreed refusal); after an error of one process a
    # peer may be gone, and a barrier would wait for it for the timeout
    from simsiam import runtime as rt

    calls = []
    monkeypatch.setattr(rt.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(rt.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(rt.dist, "destroy_process_group", lambda: calls.append("destroy"))
    two = rt.Runtime(torch.device("cpu"), "fp32", rank=0, world_size=2, owns_group=True)
    rt.stop(two, together=True)
    rt.stop(two)
    assert calls == ["barrier", "destroy", "destroy"]  # destroyed either way: a process leaving with it up can abort


def test_a_group_the_caller_made_is_left_to_the_caller(monkeypatch):
    """A script that made its own process group and called pretrain or linear_eval found it destroyed."""
    from simsiam import runtime as rt

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(rt.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(rt.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(rt.dist, "init_process_group", lambda **kwargs: calls.append("init"))
    monkeypatch.setattr(rt.dist, "is_initialized", lambda: True)  # the caller's
    theirs = rt.start("cpu", "fp32")
    assert theirs.distributed and not theirs.owns_group
    rt.stop(theirs, together=True)
    rt.stop(theirs)
    assert calls == []
    monkeypatch.setattr(rt.dist, "is_initialized", lambda: bool(calls))  # none yet: start makes it
    ours = rt.start("cpu", "fp32")
    assert ours.owns_group
    rt.stop(ours, together=True)
    assert calls == ["init", "barrier", "destroy"]


class _BareConfig:
    """What ``run_in_folder`` reads of a config, with nothing to check."""
    device, precision, PATHS = "cpu", "fp32", ()

    def __init__(self, out):
        self.out = str(out)

    def validate(self):
        pass


@pytest.mark.parametrize("failure", [None, RuntimeError("a bug"), "InputError", "agreed"])
def test_a_run_ends_its_group_together_only_when_its_body_returned_or_the_error_was_agreed(monkeypatch, tmp_path,
                                                                                            failure):
    # after an error of this process alone no barrier: a peer that failed first may be gone, and the
    # others would wait for it until the timeout instead of reporting the error
    from simsiam import run_dir
    from simsiam.errors import InputError, agreed

    together = failure in (None, "agreed")
    if failure == "InputError":
        failure = InputError("x.jpg: cannot decode image")
    if failure == "agreed":
        failure = agreed(InputError("--out run: another simsiam run is writing in this folder"))
    stopped = []
    monkeypatch.setattr(run_dir, "stop", lambda runtime, together=False: stopped.append(together))

    def body(runtime, folder):
        if failure is not None:
            raise failure
        return {"done": True}

    if failure is None:
        assert run_dir.run_in_folder(_BareConfig(tmp_path / "run"), False, body) == {"done": True}
    else:
        with pytest.raises(type(failure)):
            run_dir.run_in_folder(_BareConfig(tmp_path / "run"), False, body)
    assert stopped == [together]


@pytest.mark.parametrize("callers_device", [None, 3])
def test_the_runtime_puts_back_only_the_cuda_device_a_caller_had_chosen(monkeypatch, callers_device):
    """A process that had chosen no GPU was put on GPU 0 at the end (every torchrun rank making a
    context there); a library caller working on GPU 3 gets it back. CUDA is played here."""
    from simsiam import runtime as rt

    chosen = []
    current = {"device": callers_device if callers_device is not None else 0}
    monkeypatch.setattr(rt, "resolve_device", lambda name, local_rank=0: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: callers_device is not None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])

    def set_device(device):
        chosen.append(device if isinstance(device, int) else device.index)
        current["device"] = chosen[-1]

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    runtime = rt.start("cuda", "fp32")
    assert torch.backends.cudnn.benchmark and chosen == [1]
    rt.stop(runtime)
    assert not torch.backends.cudnn.benchmark
    assert chosen == ([1] if callers_device is None else [1, 3])


def test_a_cuda_error_putting_the_callers_device_back_does_not_replace_the_runs_outcome(monkeypatch):
    from simsiam import runtime as rt

    def set_device(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    rt.stop(rt.Runtime(torch.device("cuda", 1), "fp32", cuda_before=(3, False)))  # raises nothing
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("fails", [False, True])
def test_a_run_seeds_its_own_generator_and_gives_the_callers_back(tmp_path, fails):
    """pretrain and linear_eval seed torch's generator (a resumed run sets its state): a script that
    seeded its own trials got the same draws after the call whatever its seed."""
    from simsiam import run_dir

    def body(runtime, folder):
        torch.manual_seed(0)
        torch.set_rng_state(torch.Generator().manual_seed(7).get_state())  # as a resumed run
        torch.rand(100)
        if fails:
            raise RuntimeError("a bug")
        return {}

    after = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected = torch.rand(3)
        torch.manual_seed(seed)
        if fails:
            with pytest.raises(RuntimeError):
                run_dir.run_in_folder(_BareConfig(tmp_path / f"run{seed}"), False, body)
        else:
            run_dir.run_in_folder(_BareConfig(tmp_path / f"run{seed}"), False, body)
        after.append(torch.rand(3))
        assert torch.equal(after[-1], expected)
    assert not torch.equal(*after)


def test_processes_agree_on_a_failure_so_none_goes_on_alone(monkeypatch):
    from simsiam.errors import InputError

    # none failed: every process goes on
    assert agree_as(0, [None, None], monkeypatch) is None
    # only rank 1 failed (an unreadable image in its share): rank 0 stops too, with rank 1's error, named
    for rank, error in ((0, None), (1, InputError("x.jpg: cannot decode image"))):
        err = agree_as(rank, [None, "x.jpg: cannot decode image"], monkeypatch, error)
        assert str(err) == "rank 1: x.jpg: cannot decode image" and err.agreed
    # every process failed alike: the error itself, the failing process's own (its type kept), not renamed
    own = InputError("--out r: already holds a run")
    err = agree_as(1, ["--out r: already holds a run"] * 2, monkeypatch, own)
    assert err is own and err.agreed and str(err) == "--out r: already holds a run"
    # rank 0 failed alone, or all differently: the lowest rank's, rank 0 being the job's not named
    assert str(agree_as(1, ["a", None, "c"], monkeypatch)) == "a"
    assert str(agree_as(0, [None, "b", "c"], monkeypatch)) == "rank 1: b"
    # one process: its error as it is, never gathered
    monkeypatch.setattr("simsiam.runtime.dist.all_gather_object", None)
    import simsiam.runtime as rt

    with pytest.raises(InputError, match="^alone$") as raised, rt.agreement(rt.Runtime(torch.device("cpu"), "fp32")):
        raise InputError("alone")
    assert not raised.value.agreed


@pytest.mark.slow
def test_a_first_batch_unreadable_on_one_rank_only_stops_every_rank_with_one_line_and_no_run_files(tmp_path):
    """Rank 1's share of the first batch unreadable, rank 0's fine: the ranks agree on the failure
    there (rank 0 does not wait in a collective for a peer that left), one line says it, naming
    rank 1, and the fresh run's config.json and metrics.jsonl, written by rank 0, go with its folder."""
    from simsiam.data import GlobalBatchSampler, scan_images

    data = make_image_folder(tmp_path / "data", classes=2, per_class=16)
    images = scan_images(data)
    sampler = GlobalBatchSampler(len(images), 16, 5, rank=1, world_size=2)  # ARGS' batch size and seed
    for index in next(iter(sampler)):
        (images.root / images.paths[index]).write_bytes(b"not an image")
    out = tmp_path / "runs" / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "cli", "pretrain", str(data), "--out", str(out), *ARGS],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert result.returncode != 0 and errors == [
        f"Error: rank 1: {data}: every image of this process's share of a batch at step 0 is unreadable; "
        "replace the unreadable images by readable ones of the same names (a --resume checks the names), or start "
        "again with a larger --batch-size"], output
    assert output.count("Traceback") == 1, output  # torchrun's own, raising ChildFailedError; none of ours
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_lincls_ranks_agree_on_an_unreadable_validation_image_of_one_share(tmp_path):
    """The evaluation's shares: rank r takes every W-th VAL_DIR image. One unreadable image in rank
    1's share is counted over both ranks, or, under --strict, stops both with one line naming rank 1."""
    from simsiam.backbones import build_resnet
    from simsiam.checkpoint import to_official_layout
    from simsiam.data import scan_images
    from simsiam.model import SimSiam

    train = make_image_folder(tmp_path / "train", classes=2, per_class=8, size=16)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=4, size=16, seed=1)
    broken = val / scan_images(val).paths[1]  # the second image: rank 1's first
    broken.write_bytes(b"not an image")
    torch.manual_seed(0)
    model = SimSiam(build_resnet("resnet18", num_classes=32), 32, 8)
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": to_official_layout(model.state_dict())},
               tmp_path / "checkpoint.pth.tar")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def lincls(out, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "cli", "lincls", str(tmp_path / "checkpoint.pth.tar"), str(train), str(val),
                               "--out", str(out), "--image-size", "16", "--eval-resize", "0", "--batch-size", "8",
                               "--epochs", "1", "--workers", "0", "--device", "cpu", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    result = lincls(tmp_path / "run")
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"top1"' in l]
    assert (line["val_images"], line["val_skipped"]) == (7, 1)
    result = lincls(tmp_path / "strict", "--strict")
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert result.returncode != 0 and len(errors) == 1, output
    assert errors[0].startswith(f"Error: rank 1: {broken}: cannot decode image ("), output
    assert errors[0].endswith(f"; drop --strict to skip such images (epoch 1 is saved; --resume {tmp_path / 'strict'} "
                              "continues)"), output


@pytest.mark.slow
def test_a_fresh_run_refused_on_another_rank_later_leaves_no_run_files(tmp_path):
    """--strict, an unreadable image in rank 1's share of the second batch: rank 1 is refused, rank
    0's collective loses it. Rank 0, which wrote config.json and metrics.jsonl, takes them back as
    it does for a refusal of its own (they stayed, making the folder look like it held a run)."""
    from simsiam.data import GlobalBatchSampler, scan_images

    data = make_image_folder(tmp_path / "data", classes=2, per_class=16)
    images = scan_images(data)
    batches = iter(GlobalBatchSampler(len(images), 16, 5, rank=1, world_size=2))  # ARGS' batch size and seed
    next(batches)
    for index in next(batches):
        (images.root / images.paths[index]).write_bytes(b"not an image")
    out = tmp_path / "runs" / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "cli", "pretrain", str(data), "--out", str(out), *ARGS, "--strict"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Error: rank 1: " in output and "cannot decode image" in output, output
    assert not (tmp_path / "runs").exists(), sorted(p.name for p in out.iterdir())
