"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018; DINO)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hjepa.errors import ConfigError


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, C]: each of the k most similar training items votes for its label
    with weight exp(cosine similarity / temperature)."""
    bank = F.normalize(train_features.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_features.shape[0], chunk):
        q = F.normalize(query_features[start:start + chunk].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float32, device=bank.device)
        votes.scatter_add_(1, train_labels.to(bank.device)[idx], (sim / temperature).exp())
        out.append(votes.cpu())
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in % of class scores [N, C] (top-5 = top-C when C < 5)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels.to(top.device)[:, None]
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item()}


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 ) -> dict[str, float]:
    """Top-1 and top-5 accuracy (in %) of the weighted kNN classifier."""
    scores = knn_scores(train_features, train_labels, query_features, num_classes, k, temperature)
    return topk_accuracy(scores, query_labels)


class KNN:
    """`eval=knn`: weighted kNN on pooled features; the memory bank is the train split."""

    name, kind = "knn", "pooled"

    def __init__(self, k: int = 20, temperature: float = 0.07):
        if k < 1 or not temperature > 0:
            raise ConfigError(f"eval: expected k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        self.k, self.temperature = k, temperature

    def settings(self) -> dict:
        return {"k": self.k, "temperature": self.temperature}

    def __call__(self, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, device: torch.device) -> dict[str, float]:
        return knn_accuracy(train[0].to(device), train[1], test[0], test[1], num_classes, self.k, self.temperature)
