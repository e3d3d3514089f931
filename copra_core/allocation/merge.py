"""Mask- and rank-aware averaging of partial client adapters.

Every client reply holds the dense tensors (the head) and only the LoRA modules it
trained, at its own rank r_k <= r. A module is averaged over the clients that trained it,
weighted by their example counts, renormalised over those clients; a module nobody trained
keeps its previous value. Nothing is zero-filled and then averaged.

Two ways to combine different ranks (``strategy.options = "rank-merge=..."``):

* ``padding`` (factor space, HeteroLoRA of Cho et al. 2024,
  https://arxiv.org/abs/2401.06432): component j of a module (row j of A, column j of B)
  is averaged over the clients whose rank exceeds j; a component nobody trained keeps its
  previous value. With equal ranks and full participation this is FedAvg on the factors.
* ``product`` (FlexLoRA, Bai et al. 2024, https://arxiv.org/abs/2402.11505): the exact
  average of the clients' products ``B_k A_k``, re-factorised at rank r by truncated SVD.

The maths lives in ``copra_core/lowrank.py`` with the other product-average code (the
rules import it from there: this package's ``__init__`` loads the training code, PEFT
included); the names here are the allocation package's view of it.
"""

from __future__ import annotations

from copra_core.lowrank import Partial, pad_average, trained_by
from copra_core.lowrank import masked_product_average as product_average

__all__ = ["Partial", "pad_average", "product_average", "trained_by"]
