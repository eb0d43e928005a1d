"""Retrieval metrics from class labels: a neighbour is relevant when it has the query's label.

- recall@k: the fraction of queries with at least one relevant image among their k nearest
  (the "Recall@K" of deep metric learning, e.g. Song et al. 2016; Musgrave et al. 2020).
- mAP@k: the mean over queries of AP@k = (1 / min(k, R)) * sum_{i<=k} P@i * rel_i, where R is
  the number of relevant images in the database, P@i the precision of the first i results and
  rel_i whether result i is relevant.

Queries without a label, or whose label no database image has, are left out (and counted).
"""

from __future__ import annotations

import numpy as np

from simsiam.errors import InputError


def retrieval_metrics(query_labels: np.ndarray, neighbour_labels: np.ndarray, database_labels: np.ndarray,
                      recall_ks=(1, 5, 10), map_k: int = 10, self_in_database=False) -> dict:
    """Recall@k for each k and mAP@``map_k``; ``neighbour_labels`` [Q, K] best first (-1: no result).

    ``self_in_database`` (one bool, or one per query): the query is itself one of the database
    images (and was left out of its results), so it does not count among its relevant images.
    """
    query_labels = np.asarray(query_labels)
    neighbour_labels = np.asarray(neighbour_labels)
    depth = neighbour_labels.shape[1]
    if max(*recall_ks, map_k) > depth:
        raise InputError(f"-k {depth}: the metrics need at least {max(*recall_ks, map_k)} neighbours per query")
    counts = np.bincount(database_labels[database_labels >= 0], minlength=int(max(query_labels.max(initial=0),
                                                                                   database_labels.max(initial=0))) + 1)
    relevant_total = np.where(query_labels >= 0, counts[query_labels.clip(min=0)], 0) - np.asarray(self_in_database, np.int64)
    evaluated = (query_labels >= 0) & (relevant_total > 0)
    if not evaluated.any():
        raise InputError("--eval: no query has a label that some database image shares; the metrics need labels")
    relevant = (neighbour_labels == query_labels[:, None]) & (neighbour_labels >= 0)
    relevant, relevant_total = relevant[evaluated], relevant_total[evaluated]
    metrics = {f"recall@{k}": float(relevant[:, :k].any(axis=1).mean()) for k in recall_ks}
    hits = relevant[:, :map_k]
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, map_k + 1)
    average_precision = (precision_at_i * hits).sum(axis=1) / np.minimum(map_k, relevant_total)
    metrics[f"mAP@{map_k}"] = float(average_precision.mean())
    metrics["queries_evaluated"] = int(evaluated.sum())
    metrics["queries_left_out"] = int((~evaluated).sum())
    return metrics
