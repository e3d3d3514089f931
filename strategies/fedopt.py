"""Server-side adaptive optimisers over the adapter: FedAdam and FedYogi (Flower's own)."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from strategies.base import AdapterState, AggregationRule, ClientUpdate, example_weights

if TYPE_CHECKING:
    from flwr.serverapp.strategy.fedopt import FedOpt


@functools.cache
def _flower_stepper(optimiser: str) -> type[FedOpt]:
    """Flower's ``FedAdam`` or ``FedYogi``, taking the already averaged adapter as its input.

    ``FedAdam.aggregate_train`` first asks its parent for the example-weighted average of
    the replies, then applies the Adam step. Slotting ``AveragedAlready`` under ``FedOpt``
    in the MRO lets us hand it that average directly, so the optimiser step is Flower's
    code verbatim, not a copy of it. Built on first use (and cached): Flower loads in
    seconds, and the rules import without it.
    """
    from flwr.app import ArrayRecord, MetricRecord
    from flwr.serverapp import strategy as flower

    class AveragedAlready(flower.FedAvg):
        def aggregate_train(self, server_round: int, replies: Iterable) -> tuple[Any, Any]:
            assert isinstance(replies, ArrayRecord)
            return replies, MetricRecord()

    base = {"FedAdam": flower.FedAdam, "FedYogi": flower.FedYogi}[optimiser]
    name = f"_{optimiser}Step"
    return type(name, (base, AveragedAlready), {"__module__": __name__, "__qualname__": name})


def __getattr__(name: str) -> type[FedOpt]:
    """``strategies.fedopt._FedAdamStep`` / ``_FedYogiStep`` by name, so a pickled rule unpickles."""
    if name in ("_FedAdamStep", "_FedYogiStep"):
        return _flower_stepper(name[1:-4])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ServerOptimiser(AggregationRule):
    """Example-weighted average as a pseudo-gradient, then a server-side optimiser step.

    ``Delta_t = sum_k w_k theta_k - theta_t`` is treated as a (negative) gradient and fed
    to Flower's ``FedAdam`` / ``FedYogi`` (Reddi et al. 2021, Adaptive Federated
    Optimization, https://arxiv.org/abs/2003.00295). Moments persist across rounds.
    Applied to every adapter tensor (A, B and the head) in factor space.

    Parameters
    ----------
    eta : float
        Server learning rate: roughly the per-coordinate step per round. Adapter entries
        are ~1e-2, so Flower's default 0.1 would swamp them.
    beta_1, beta_2 : float
        First and second moment decay.
    tau : float
        Adaptivity: added to sqrt(v); larger = closer to plain momentum.
    """

    #: Which of Flower's server optimisers steps (``_flower_stepper``).
    _flower_optimiser: ClassVar[str]

    def __init__(self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> None:
        if eta <= 0 or tau <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1):
            raise ValueError("need eta > 0, tau > 0 and betas in [0, 1)")
        self.optimiser = _flower_stepper(self._flower_optimiser)(eta=eta, beta_1=beta_1, beta_2=beta_2, tau=tau)
        self._round = 0

    def aggregate(self, updates: Sequence[ClientUpdate], current: Mapping[str, torch.Tensor]) -> AdapterState:
        weights = example_weights(updates, self.name)
        average = {
            key: sum(w * u.state[key].double() for w, u in zip(weights, updates, strict=True)).float().numpy()
            for key in current
        }
        self._round += 1
        self.optimiser.current_arrays = {k: v.to(torch.float32).numpy() for k, v in current.items()}
        from flwr.app import Array, ArrayRecord  # loaded already: the optimiser is Flower's

        record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in average.items()})
        stepped, _ = self.optimiser.aggregate_train(self._round, record)
        return {
            k: torch.from_numpy(np.asarray(a.numpy(), dtype=np.float32)).to(current[k].dtype)
            for k, a in stepped.items()
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"round": torch.tensor(self._round, dtype=torch.int64)}
        for moment in ("m_t", "v_t"):
            for key, value in (getattr(self.optimiser, moment) or {}).items():
                state[f"{moment}/{key}"] = torch.from_numpy(np.array(value))
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._round = int(state["round"])
        for moment in ("m_t", "v_t"):
            prefix = moment + "/"
            values = {k[len(prefix) :]: v.numpy().copy() for k, v in state.items() if k.startswith(prefix)}
            setattr(self.optimiser, moment, values or None)


class FedAdamRule(_ServerOptimiser):
    """FedAdam: Adam on the server over the averaged adapter update (Flower's FedAdam)."""

    name = "fedadam"
    _flower_optimiser = "FedAdam"


class FedYogiRule(_ServerOptimiser):
    """FedYogi: Yogi's additive second-moment update on the server (Flower's FedYogi)."""

    name = "fedyogi"
    _flower_optimiser = "FedYogi"
