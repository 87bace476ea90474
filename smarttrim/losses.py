"""Training objectives of SmartTrim (paper Section 4.2, eqs. 9-12) and the METER task losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def task_loss(task: str, logits: Tensor, labels: Tensor) -> Tensor:
    """METER's task losses. VQA: soft-score BCE summed over answers, mean over the batch (METER scales the
    element mean by the number of answers). NLVR2 / SNLI-VE: cross-entropy over class indices. Retrieval:
    METER's IRTR rank loss, the softmax cross-entropy over each image's (B, K) ``rank_output`` scores of its
    K texts, ``labels`` (B,) the index of the true one (METER: always 0, before its K - 1 false texts)."""
    if task == "vqa":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)) * labels.shape[1]
    return F.cross_entropy(logits, labels)


def cost_loss(keep_groups: dict[str, Tensor], gamma: dict[str, float]) -> Tensor:
    """Eqs. 9-10: mean over trimmer groups p of (β_p - γ_p)^2.

    ``keep_groups[p]`` is (B,): per instance, the mean over the group's trimmers of the fraction of its
    trimmable tokens (or heads) kept. β_p is its batch mean, so the budget holds for the batch while
    single instances may spend more or less (adaptive computation).
    """
    terms = [(kept.mean() - gamma[group]) ** 2 for group, kept in keep_groups.items()]
    if not terms:
        raise ValueError("cost_loss: no trimmer groups (a model without trimmers has no cost loss)")
    return torch.stack(terms).mean()


def distill_kl(task: str, trimmed_logits: Tensor, full_logits: Tensor) -> Tensor:
    """KL term of eq. 11 between the trimmed f(x,P) and full-capacity f(x,∅) predictions.

    Written as in ``F.kl_div(log f(x,P), f(x,∅))``: KL(f(x,∅) || f(x,P)), the full model's prediction as
    a fixed (detached) target the trimmed model is pulled towards. VQA predictions are independent
    per-answer Bernoullis (sigmoid): their KLs are summed over answers like the BCE task loss; the other
    tasks' predictions are softmax distributions (retrieval: over each image's K texts). Mean over the batch.
    """
    full_logits = full_logits.detach()
    if task == "vqa":
        p = torch.sigmoid(full_logits)
        log_q1, log_q0 = F.logsigmoid(trimmed_logits), F.logsigmoid(-trimmed_logits)
        log_p1, log_p0 = F.logsigmoid(full_logits), F.logsigmoid(-full_logits)
        kl = p * (log_p1 - log_q1) + (1 - p) * (log_p0 - log_q0)  # (B, A)
        return kl.sum(-1).mean()
    return F.kl_div(F.log_softmax(trimmed_logits, -1), F.log_softmax(full_logits, -1), reduction="batchmean",
                    log_target=True)
