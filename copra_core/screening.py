"""Screening of client updates before aggregation: reject a bad reply, keep the run going.

One faulty or malicious client must not end a federation or poison the global adapter.
Each reply is checked on its own (finite values, the global adapter's keys and shapes,
the transport dtype, a plausible example count), then against the round (update norm
relative to the other replies). A rejected reply gets a reason that names the client and
the problem; the caller logs it and leaves the reply out of aggregation and diagnostics.

The norm test compares each client with the median of the *other* replies rather than
with the median of all: with two clients, an outlier drags the median of all halfway
towards itself and would pass; against the other reply alone it still stands out.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from copra_core.adapters import AdapterMismatchError, AdapterState, check_compatible
from copra_core.allocation.masking import check_partial


def check_update(
    state: AdapterState,
    reference: AdapterState,
    wire_dtypes: Mapping[str, str],
    transport_dtype: str,
    num_examples: object,
    max_num_examples: int = 0,
    *,
    partial: bool = False,
) -> str | None:
    """Why this single reply cannot be aggregated, or None when it can.

    Parameters
    ----------
    state : AdapterState
        The client's adapter, decoded to fp32.
    reference : AdapterState
        The global adapter the client was sent (keys and shapes must match).
    wire_dtypes : Mapping[str, str]
        Dtype of each array as it arrived (before decoding), e.g. ``"float16"``.
    transport_dtype : str
        The dtype every client must send (``federation.transport-dtype``).
    num_examples : object
        The reply's ``num-examples`` metric as received.
    max_num_examples : int
        Upper bound on ``num-examples`` (0 = none).
    partial : bool
        The rule accepts partial replies (HeteroLoRA allocation): a subset of the modules at
        a rank <= r, checked with ``check_partial``.
    """
    try:
        (check_partial if partial else check_compatible)(state, reference, source="reply")
    except AdapterMismatchError as err:
        return (
            str(err)
            .replace("reply does not match the global adapter: ", "keys/shapes differ from the global adapter: ")
            .replace("reply does not fit the global adapter: ", "keys/shapes do not fit the global adapter: ")
        )
    wrong_dtype = sorted(k for k, d in wire_dtypes.items() if d != transport_dtype)
    if wrong_dtype:
        return f"dtype {wire_dtypes[wrong_dtype[0]]} instead of {transport_dtype} for {wrong_dtype[:3]}"
    broken = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if broken:
        return f"non-finite values (NaN/Inf) in {broken[:3]}{' ...' if len(broken) > 3 else ''}"
    return _check_num_examples(num_examples, max_num_examples)


def _check_num_examples(value: object, cap: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"num-examples is {value!r}, not a number"
    if not math.isfinite(value) or value != int(value) or value < 1:
        return f"num-examples is {value!r}, not a whole number >= 1"
    if cap and value > cap:
        return f"num-examples {int(value)} exceeds screening.max-num-examples={cap}"
    return None


def update_norm(state: AdapterState, reference: AdapterState) -> float:
    """Euclidean norm of ``state - reference`` over the reply's tensors (fp64 accumulation).

    A partial reply (allocation) is compared with the matching leading block of each
    global tensor (its modules, its rank components).
    """
    total = 0.0
    for key, value in state.items():
        ref = reference[key][tuple(slice(0, n) for n in value.shape)]
        total += float((value - ref).double().pow(2).sum())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[int, float], max_ratio: float) -> dict[int, str]:
    """Clients whose update norm exceeds ``max_ratio`` x the median of the others' norms.

    ``norms`` maps a client id to its update norm. Needs at least two clients (one client
    has nothing to be compared with); ``max_ratio`` 0 switches the test off.
    """
    if max_ratio <= 0 or len(norms) < 2:
        return {}
    out = {}
    for client, norm in norms.items():
        others = statistics.median(n for c, n in norms.items() if c != client)
        if norm > max_ratio * others:
            out[client] = f"update norm {norm:.4g} > {max_ratio:g} x median of the other replies ({others:.4g})"
    return out
