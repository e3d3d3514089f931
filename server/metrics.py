"""Federated evaluation metrics of the clients' pooled validation examples.

Flower's default (``aggregate_metricrecords``) averages every metric weighted by the
clients' example counts. That is exact for a mean over examples (classification loss and
accuracy) but not for a ratio over tokens (the causal-LM loss is per response token, and
clients' examples differ in length) nor for a nonlinear metric: a mean of perplexities is
not the perplexity of the mean loss, it overstates it (Jensen). So the ClientApp sends the
task's additive statistics beside its metrics (``sum/<name>``), and the server sums them
over the replies and summarises once: exactly the metrics of all clients' examples pooled.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from copra_core.protocol import SUM_PREFIX

Summarise = Callable[[dict[str, float]], dict[str, float]]


def pooled_metrics(summarise: Summarise) -> Callable[[list[RecordDict], str], MetricRecord]:
    """A FedAvg ``evaluate_metrics_aggr_fn`` that pools the clients' ``sum/`` statistics.

    Parameters
    ----------
    summarise
        The task's ``summarise``: summed statistics to metrics.

    Returns
    -------
    Callable
        ``(reply contents, weighting key) -> MetricRecord``. Replies without sums (another
        ClientApp; Flower has already checked that all replies carry the same keys) get
        Flower's example-weighted mean.
    """

    def aggregate(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        sums: dict[str, float] = {}
        for record in records:
            metrics = next(iter(record.metric_records.values()))  # Flower checked: exactly one
            for key, value in metrics.items():
                if key.startswith(SUM_PREFIX):
                    name = key.removeprefix(SUM_PREFIX)
                    sums[name] = sums.get(name, 0.0) + float(value)
        if not sums:
            return aggregate_metricrecords(records, weighted_by_key)
        return MetricRecord(summarise(sums))

    return aggregate
