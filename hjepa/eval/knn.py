"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018; DINO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, C]: each of the k most similar training items votes for its label
    with weight exp(cosine similarity / temperature)."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of the weighted kNN classifier."""
    num_classes = int(max(train_labels.max(), query_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, query_features, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hits = top == query_labels[:, None]
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item()}
