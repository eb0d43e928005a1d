"""Embedding images with a backbone."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from simsiam.data import ImageDataset, make_loader
from simsiam.runtime import Runtime


@torch.no_grad()
def embed(model: nn.Module, dataset: ImageDataset, runtime: Runtime, batch_size: int = 256,
          workers: int = 0, on_batch=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [N, D] float32, labels [N] and dataset indices [N] of the decodable images, in order.

    ``model`` is put in eval mode for the pass and given back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    features, labels, indices = [], [], []
    loader = make_loader(dataset, batch_size=batch_size, workers=workers, pin_memory=runtime.device.type == "cuda")
    try:
        for batch, unreadable in loader:
            if batch is not None:
                images, batch_labels, batch_indices = batch
                images = images.to(runtime.device, non_blocking=True)
                if runtime.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with runtime.autocast():
                    out = model(images)
                features.append(out.float().cpu())
                labels.append(batch_labels)
                indices.append(batch_indices)
            if on_batch is not None:
                on_batch(batch, unreadable)
    finally:
        model.train(was_training)
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(features).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()
