"""Weighted kNN classification, the protocol of DINO's ``eval_knn.py``.

Features are L2-normalised, similarity is the cosine, each of the k nearest training images votes
``exp(sim / T)`` for its label, and the class with the most weight wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class KnnResult:
    k: int
    top1: float
    top5: float
    predictions: np.ndarray  # [N, min(5, classes)] class indices, best first


def vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, temperature: float,
         num_classes: int) -> torch.Tensor:
    """Class scores [B, C] from the k most similar neighbours (columns sorted by similarity)."""
    weights = (neighbour_sims[:, :k].float() / temperature).exp()
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``(top-5 predictions, top-1 accuracy, top-5 accuracy)`` of class scores."""
    predictions = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = predictions == labels[:, None]
    return predictions, hits[:, 0].float().mean().item(), hits.any(dim=1).float().mean().item()


def torch_neighbours(train: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int = 1024):
    """Exact top-k by cosine similarity with chunked matrix products (memory: chunk x N)."""
    train = F.normalize(train.float(), dim=1)
    sims, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = F.normalize(queries[start:start + chunk_size].float().to(train.device), dim=1)
        top = (q @ train.T).topk(k, dim=1)
        sims.append(top.values)
        indices.append(top.indices)
    return torch.cat(sims), torch.cat(indices)


def weighted_knn(train_features, train_labels, val_features, val_labels, ks=(20,), temperature: float = 0.07,
                 num_classes: int | None = None, device: str | torch.device = "cpu",
                 chunk_size: int = 1024) -> list[KnnResult]:
    """Weighted kNN top-1/top-5 of ``val`` against ``train``, for each k in ``ks``."""
    device = torch.device(device)
    train = torch.as_tensor(np.asarray(train_features)).to(device)
    queries = torch.as_tensor(np.asarray(val_features))
    train_labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long).to(device)
    val_labels = torch.as_tensor(np.asarray(val_labels), dtype=torch.long).to(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), val_labels.max().item())) + 1
    sims, indices = torch_neighbours(train, queries, max(ks), chunk_size)
    labels = train_labels[indices]
    results = []
    for k in ks:
        predictions, top1, top5 = accuracy(vote(sims, labels, k, temperature, num_classes), val_labels)
        results.append(KnnResult(k, top1, top5, predictions.cpu().numpy()))
    return results
