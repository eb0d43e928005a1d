"""The one place that decides device, precision and distributed set-up; other modules ask it.

Distributed runs are started by ``torchrun``, which sets RANK, WORLD_SIZE and LOCAL_RANK: NCCL
on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError, SimSiamError, agreed

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" or "bf16"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # start() made the process group, so stop() ends it (not a caller's own)
    cuda_before: tuple[int | None, bool] | None = None  # the CUDA device (None: none chosen) and
    # cudnn.benchmark stop() puts back

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def channels_last(self) -> bool:
        # channels_last speeds up convolutions with tensor cores; on CPU it brings nothing
        return self.device.type == "cuda" and self.precision == "bf16"

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in DEVICES:
        raise InputError(f"--device {name}: choose one of {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); "
                         "use --device cpu, or install a CUDA build of torch")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 (autocast) on a CUDA GPU that computes in bf16 natively, and fp32 elsewhere.

    GPUs before Ampere (compute capability < 8: V100, T4) have no bf16 tensor cores: autocast there
    emulates bf16, slower than fp32, so ``auto`` keeps fp32; ``--precision bf16`` still asks for it.
    """
    if name not in PRECISIONS:
        raise InputError(f"--precision {name}: choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return "bf16" if native_bf16 else "fp32"
    return name


def start(device: str = "auto", precision: str = "auto") -> Runtime:
    """Pick device and precision; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    precision = resolve_precision(precision, dev)
    cuda_before = None
    if dev.type == "cuda":
        # the device a caller already works on (asking a process that has none yet would choose GPU 0,
        # and putting that back would make a context there from every torchrun rank)
        cuda_before = (torch.cuda.current_device() if torch.cuda.is_initialized() else None,
                       torch.backends.cudnn.benchmark)
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels, as official
    owns_group = world_size > 1 and not dist.is_initialized()  # a caller's own group is left to the caller
    if owns_group:
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=30),
        )
    return Runtime(dev, precision, rank, world_size, local_rank, owns_group, cuda_before)


def stop(runtime: Runtime, together: bool = False) -> None:
    """End the process group. ``together``: every process ends here (a finished command, or an
    error they agreed on), so they first wait for each other: one tearing the group down while
    another still works, or has already left, can hang the teardown (pytorch/pytorch#75097; with
    torch 2.4's gloo, 1 run in 6 of a refusal agreed by two processes hung there until torchrun
    killed it, its Error line unprinted). After an error of this process alone a peer may be gone,
    and a barrier would wait for it: the group is destroyed at once, since a process leaving with
    its group up can abort ('terminate called without an active exception', 1 run in 8).

    A group start() did not make (a library caller's) is left up, and the CUDA device and
    ``cudnn.benchmark`` start() set go back to what they were."""
    if runtime.owns_group and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
    if runtime.cuda_before is not None:
        device, benchmark = runtime.cuda_before
        torch.backends.cudnn.benchmark = benchmark
        if device is not None and device != torch.cuda.current_device():
            with contextlib.suppress(RuntimeError):  # a CUDA error here must not replace the run's outcome
                torch.cuda.set_device(device)


def agree(runtime: Runtime, error: SimSiamError | None) -> None:
    """Under torchrun, where a check can fail on some processes only (a file one node lacks, an
    unreadable image in one rank's share): every process learns whether any failed, and if one
    did, every process raises, none going on to wait in a collective for a peer that has left.

    A collective: every process calls it at the same point, after checks that run none. The error
    raised is marked ``agreed`` (the CLI reports it once, from rank 0): the failing process's of
    lowest rank, named by its rank unless that is 0 (the job's own rank). One process: ``error``.
    """
    if not runtime.distributed:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * runtime.world_size
    dist.all_gather_object(messages, None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if not failed:
        return
    rank, message = failed[0]
    if rank != 0:
        message = f"rank {rank}: {message}"
    raise agreed(error if error is not None and str(error) == message else InputError(message))


@contextlib.contextmanager
def agreement(runtime: Runtime, when: bool = True):
    """Run a block of checks (no collective inside) on every process, then :func:`agree` on its
    :class:`SimSiamError`, if any. ``when`` False: the block alone, its error raised as it is."""
    if not when:
        yield
        return
    error = None
    try:
        yield
    except SimSiamError as err:
        error = err
    agree(runtime, error)


def data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` under DDP in a parallel run, else itself: steps run the result, checkpoints save ``model``."""
    if not runtime.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def sync_batchnorm(model: nn.Module, runtime: Runtime) -> nn.Module:
    """Batch statistics over the global batch, as the official script (SyncBN under DDP).

    PyTorch's SyncBatchNorm runs only on GPUs (and DDP refuses it on CPU modules); on CPUs
    (gloo) every BatchNorm becomes a :class:`CPUSyncBatchNorm`, which computes the same
    statistics, so that CPU runs, and the tests, behave as GPU runs do.
    """
    if not runtime.distributed:
        return model
    if runtime.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.__class__ = CPUSyncBatchNorm  # same parameters and buffers, so same state dict
    return model


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks (all-reduce), with its gradient: each rank's output
    depends on every rank's input, so an input's gradient is the sum over ranks of the output's.
    (What torch.distributed.nn.functional.all_reduce does; that module is deprecated.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised batch norm for CPU tensors under the gloo backend.

    Normalises with the mean and biased variance of the global batch, and updates the running
    variance with the unbiased one, like :class:`torch.nn.SyncBatchNorm`'s CUDA kernel. Two
    all-reduces (mean, then squared deviations) keep the variance as accurate as
    ``F.batch_norm``'s two-pass computation; the gradient flows through the autograd-aware
    all-reduce. Outside training, or without a process group, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(input)
        all_reduce = _SumOverRanks.apply
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = torch.tensor([input.numel() // input.shape[1]], dtype=input.dtype)
        sums = all_reduce(torch.cat([input.sum(dims), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count
        centered = input - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / count
        output = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), momentum)
        return output


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor copied to ``device`` without making the host wait: a copy from pageable memory
    waits for every kernel queued before it, which would stop the host from running ahead of the GPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
