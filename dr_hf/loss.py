"""Distillation from sparse top-K teacher outputs."""

from __future__ import annotations

import torch


def dense_teacher_log_probs(indices: torch.Tensor, log_probs: torch.Tensor, num_classes: int,
                            outside_topk: str = "uniform") -> torch.Tensor:
    """(B, K) top-K ids and log-probs -> (B, C) teacher log-probabilities.

    ``outside_topk="uniform"`` spreads the mass outside the top K (``1 - sum(exp)``) evenly over the other classes;
    ``"renormalize"`` renormalises over the top K (the other classes get probability 0). Entries with log-prob
    ``-inf`` are padding (e.g. a one-hot target).
    """
    if outside_topk not in ("uniform", "renormalize"):
        raise ValueError(f"outside_topk must be 'uniform' or 'renormalize', got {outside_topk!r}")
    if int(indices.max()) >= num_classes:
        raise ValueError(f"teacher class id {int(indices.max())} >= the student's {num_classes} classes")
    log_probs = log_probs.float()
    dense = torch.zeros(indices.shape[0], num_classes, dtype=torch.float32, device=indices.device)
    if outside_topk == "renormalize":  # in log space: top-K mass that underflows exp() still renormalises to 1
        probs = (log_probs - torch.logsumexp(log_probs, -1, keepdim=True)).exp()
    else:
        probs = log_probs.exp()
        rest = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0)
        others = (num_classes - torch.isfinite(log_probs).sum(-1, keepdim=True)).clamp_min(1)
        dense += rest / others
    dense.scatter_(1, indices, probs)  # the K ids of a row are distinct
    return torch.log(dense)


def one_hot_target(labels: torch.Tensor, k: int, num_classes: int):
    """A one-hot target in the sparse (ids, log-probs) form: the label with log-prob 0, K-1 distinct padding ids at -inf."""
    ids = (labels[:, None] + torch.arange(k, device=labels.device)[None, :]) % num_classes
    lp = torch.full(ids.shape, float("-inf"), device=labels.device)
    lp[:, 0] = 0.0
    return ids, lp


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of KL(teacher_T || student_T) * T^2, with teacher_T = softmax(log q / T)."""
    t = float(temperature)
    teacher = torch.log_softmax(teacher_log_probs / t, dim=-1) if t != 1.0 else teacher_log_probs
    student = torch.log_softmax(student_logits.float() / t, dim=-1)
    p = teacher.exp()
    kl = (p * (torch.where(p > 0, teacher, torch.zeros_like(teacher)) - student)).sum(-1)
    return kl.mean() * (t * t)
