"""The validation split held out from the training data: deterministic, stratified by class."""

from __future__ import annotations

import torch


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)``: ``round(fraction * n_c)`` images of every class ``c`` go to validation.

    The choice depends only on the labels, ``fraction`` and ``seed``, so a run, its resumption and a
    later ``resnetlab eval --split val`` all see the same split. Stratifying keeps the class balance of
    small data sets (the 1,797 digits) in both parts.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    val_parts = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        val_parts.append(members[: round(fraction * len(members))])
    val = torch.sort(torch.cat(val_parts)).values if val_parts else torch.empty(0, dtype=torch.long)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val] = True
    return torch.nonzero(~is_val).flatten(), val
