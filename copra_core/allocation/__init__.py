"""HeteroLoRA: budgeted allocation of LoRA modules by zero-cost proxies (docs/methods.md#heterolora).

Zhang et al. 2024, "Unlocking the Global Synergies in Low-Rank Adapters",
https://arxiv.org/abs/2406.14956.

Federated, one allocation round reads:

1. every client scores each candidate module with a proxy on its own batches
   (``proxies/``, one file per proxy) and replies with the scores;
2. the server averages the scores by example count and picks the modules that fit the
   budget (``budget.py``), then broadcasts the ranking and the chosen modules;
3. each client trains only its modules, at its own rank (``masking.py``), and replies
   with just those factors;
4. the server averages every module over the clients that trained it (``merge.py``,
   rule ``strategies/masked.py``) and exports the result with PEFT's ``rank_pattern``
   (``export.py``).
"""

from copra_core.allocation.budget import Allocation, allocate, module_costs
from copra_core.allocation.masking import (
    ClientPlan,
    check_partial,
    client_plan,
    effective_state,
    partial_state,
    restricted_training,
)
from copra_core.allocation.merge import pad_average, product_average

__all__ = [
    "Allocation",
    "ClientPlan",
    "allocate",
    "check_partial",
    "client_plan",
    "effective_state",
    "module_costs",
    "pad_average",
    "partial_state",
    "product_average",
    "restricted_training",
]
