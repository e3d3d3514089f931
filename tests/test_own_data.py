"""Own data (issue 21): a path in data.dataset, node-local files, the round-0 data check, a server without data.

Unit tests read small files written under pytest's tmp dirs; one end-to-end Flower
simulation (a natural partition of three files, one of them with labels outside
``data.labels``) backs several assertions. Label mapping and each bad-row kind are
covered by tests/test_local_data.py.
"""

from __future__ import annotations

import csv
import json
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from copra_core import data, protocol
from copra_core.config import SIMULATION_ENV, ConfigError, RunConfig
from copra_core.local_data import LocalDataError
from copra_core.tasks import build_task
from copra_core.tasks.base import DATA_LABEL_COUNTS, DATA_SKIPPED_ROWS, DATA_TRAIN_ROWS, DATA_VAL_ROWS
from tests.helpers import message_from, metrics_rows, run_tagged, tiny_config

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("negative", "positive")


def sst2_rows(start: int, count: int) -> list[dict[str, str]]:
    """Rows of the vendored SST-2 training file with label names (data/MANIFEST.md)."""
    with (ROOT / "data" / "sst2" / "train.tsv").open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [row for _, row in zip(range(start + count), reader, strict=False)][start:]
    return [{"sentence": row["sentence"].strip(), "label": LABELS[int(row["label"])]} for row in rows]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def own_config(dataset: Path, **overrides: object) -> RunConfig:
    return tiny_config(
        **{
            "data.dataset": str(dataset),
            "data.text-columns": "sentence",
            "data.label-column": "label",
            "data.labels": ",".join(LABELS),
            **overrides,
        }
    )


def test_a_file_is_partitioned_like_a_registered_dataset(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", sst2_rows(0, 200))
    config = own_config(path, **{"data.partition": "iid", "federation.clients": 2})
    config.validate()
    task = build_task(config)
    assert task.num_labels == 2
    train0, val0, summary0 = task.client_data(0, 2)
    train1, _, summary1 = task.client_data(1, 2)
    # IID halves of 200 rows, 10 % of each held out; every row is in exactly one partition.
    assert summary0[DATA_TRAIN_ROWS] + summary0[DATA_VAL_ROWS] == 100
    assert summary1[DATA_TRAIN_ROWS] + summary1[DATA_VAL_ROWS] == 100
    assert len(train0) == summary0[DATA_TRAIN_ROWS] and len(val0) == summary0[DATA_VAL_ROWS]
    assert summary0[DATA_SKIPPED_ROWS] == 0
    own = data.path_client_data(config.data, 0, 2, config.seed)
    expected = [sum(1 for r in (*own.train, *own.val) if r["label"] == i) for i in range(2)]
    assert summary0[DATA_LABEL_COUNTS] == expected and sum(expected) == 100
    # Encoded examples carry the label index of the declared label space.
    assert {train0[i]["label"] for i in range(len(train0))} <= {0, 1}
    assert len(train1) == summary1[DATA_TRAIN_ROWS]


def test_natural_partition_gives_client_i_file_i(tmp_path):
    folder = tmp_path / "silos"
    folder.mkdir()
    write_csv(folder / "a_clinic.csv", sst2_rows(0, 40))
    pq.write_table(pa.Table.from_pylist(sst2_rows(40, 80)), folder / "b_bank.parquet")
    config = own_config(folder, **{"federation.clients": 2})
    first = data.path_client_data(config.data, 0, 2, config.seed)
    second = data.path_client_data(config.data, 1, 2, config.seed)
    assert len(first.train) + len(first.val) == 40
    assert len(second.train) + len(second.val) == 80
    assert set(second.train["sentence"]) <= {r["sentence"] for r in sst2_rows(40, 80)}
    with pytest.raises(LocalDataError, match=r"needs federation.clients=2, got 3"):
        data.path_client_data(config.data, 0, 3, config.seed)


def test_the_example_cache_sees_an_edited_file(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", sst2_rows(0, 50))
    config = own_config(path)
    before = data.source_identity(config.data, None)
    write_csv(path, sst2_rows(0, 60))
    assert data.source_identity(config.data, None) != before


def test_a_node_reads_its_own_files(tmp_path):
    train = write_csv(tmp_path / "train.csv", sst2_rows(0, 50))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(50, 20)))
    config = tiny_config(**{"data.labels": ",".join(LABELS), "data.text-columns": "sentence"})
    own = data.path_client_data(config.data, 7, 1, config.seed, data.NodeFiles(str(train), str(val)))
    assert (len(own.train), len(own.val)) == (50, 16)  # the validation file capped at data.val-max=16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.dataset": "sst"}, r"Did you mean 'sst2'\?"),
        ({"data.dataset": "./x.csv"}, r"data.labels"),
        ({"data.dataset": "./x.csv", "data.labels": "a,b", "data.server-eval": "dataset"}, r"data.eval-path"),
        ({"data.labels": "a,b", "data.server-eval": "dataset"}, r"data.eval-path"),
        ({"data.dataset": "./x.csv", "data.labels": "a,b", "task": "causal_lm"}, r"sequence_classification only"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    config = RunConfig()
    config.update(overrides)
    with pytest.raises(ConfigError, match=message):
        config.validate()


@pytest.mark.parametrize(
    ("overrides", "has_data"),
    [
        ({}, True),  # the registered dataset's dev split (the demo, unchanged)
        ({"data.server-eval": "none"}, False),
        ({"data.dataset": "./x.csv", "data.labels": "a,b"}, False),
        ({"data.dataset": "./x.csv", "data.labels": "a,b", "data.eval-path": "./e.csv"}, True),
        ({"data.labels": "a,b"}, False),  # deployed nodes' own files: sst2's dev split is not their label space
        ({"data.labels": "a,b", "data.eval-path": "./e.csv", "data.server-eval": "none"}, False),
    ],
)
def test_server_eval_auto_resolves_to_the_servers_own_data(overrides, has_data):
    config = RunConfig()
    config.update(overrides)
    config.validate()
    assert config.data.server_has_data is has_data


def _context(node_config: dict) -> Context:
    from flwr.app import RecordDict as State

    return Context(run_id=1, node_id=42, node_config=node_config, state=State(), run_config={})


def test_a_deployed_node_refuses_a_run_config_path_without_reading_it(tmp_path, monkeypatch):
    import client.app as client_app
    from copra_core import local_data

    secret = write_csv(tmp_path / "secret.csv", sst2_rows(0, 20))
    monkeypatch.delenv(SIMULATION_ENV, raising=False)  # a deployed SuperNode: no simulation marker

    def never(*args, **kwargs):
        raise AssertionError("the node opened a file the run config named")

    monkeypatch.setattr(local_data, "read_table", never)
    config = own_config(secret)
    msg = message_from(RecordDict({protocol.CONFIG: ConfigRecord(config.to_flat())}), "train", dst_node_id=42)
    context = _context({protocol.PARTITION_ID: 0, protocol.NUM_PARTITIONS: 2})
    with pytest.raises(ConfigError, match=r"Config key 'data.dataset'.*reads only the files its own node config"):
        client_app._learner(msg, context)
    config = tiny_config(**{"data.dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"Config key 'data.dir'"):
        client_app.refuse_run_config_paths(config)
    monkeypatch.setenv(SIMULATION_ENV, "1")  # inside copra-fl simulate the same config is the user's own
    client_app.refuse_run_config_paths(own_config(secret))


def test_a_node_without_partition_id_has_a_stable_id():
    import client.app as client_app

    named = _context({protocol.DATA_PATH: "/data/train.csv", protocol.NODE_NAME: "clinic-a"})
    pid, _, files = client_app.node_source(named)
    assert files == data.NodeFiles("/data/train.csv", "")
    assert pid == client_app.node_source(named)[0]
    assert pid != client_app.node_source(_context({protocol.DATA_PATH: "x", protocol.NODE_NAME: "clinic-b"}))[0]
    pinned = _context({protocol.DATA_PATH: "x", protocol.PARTITION_ID: 3})
    assert client_app.node_source(pinned)[0] == 3


def test_sampling_never_draws_an_excluded_node():
    from server.sampling import NodeSampler

    class FakeGrid:
        def get_node_ids(self):
            return [11, 12, 13]

    sampler = NodeSampler(seed=0, partial=False, timeout=1.0)
    sampler.exclude([12])
    with sampler.draw(FakeGrid(), 1, "train") as grid:  # type: ignore[arg-type]
        assert list(grid.get_node_ids()) == [11, 13]


# ---------------------------------------------------------------------- one end-to-end simulation
CAPTURING_RUN = textwrap.dedent(
    """
    import json
    import sys

    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from copra_core.config import RunConfig
    from simulations.runner import simulate

    received = []
    original = InMemoryGrid.send_and_receive

    def recording(self, messages, *args, **kwargs):
        replies = list(original(self, messages, *args, **kwargs))
        for reply in replies:
            if reply.has_error():
                received.append({"error": reply.error.reason})
                continue
            content = reply.content
            received.append(
                {
                    "type": reply.metadata.message_type,
                    "arrays": sorted(content.array_records),
                    "metrics": {
                        name: {k: type(v).__name__ if not isinstance(v, list) else [type(x).__name__ for x in v]
                               for k, v in record.items()}
                        for name, record in content.metric_records.items()
                    },
                    "configs": {name: dict(record) for name, record in content.config_records.items()},
                }
            )
        return replies

    InMemoryGrid.send_and_receive = recording
    config = RunConfig.from_flat(json.loads(sys.argv[1]))
    simulate(config)
    with open(sys.argv[2], "w") as handle:
        json.dump(received, handle)
    """
)


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """Three nodes, a natural partition (CSV, Parquet, JSON Lines); node 2 has labels outside data.labels."""
    tmp = tmp_path_factory.mktemp("own_data")
    folder = tmp / "silos"
    folder.mkdir()
    write_csv(folder / "0_clinic.csv", sst2_rows(0, 160))
    pq.write_table(pa.Table.from_pylist(sst2_rows(160, 160)), folder / "1_bank.parquet")
    odd = [{**row, "label": "neutral"} if i % 5 == 0 else row for i, row in enumerate(sst2_rows(320, 60))]
    (folder / "2_phone.jsonl").write_text("".join(json.dumps(r) + "\n" for r in odd))
    out = tmp / "run"
    config = own_config(
        folder,
        **{
            "federation.clients": 3,
            "federation.rounds": 2,
            "federation.min-train-nodes": 2,
            "model.max-length": 32,
            "out-dir": str(out),
        },
    )
    script = tmp / "capture.py"
    script.write_text(CAPTURING_RUN)
    captured = tmp / "received.json"
    proc = run_tagged([sys.executable, str(script), json.dumps(config.to_flat()), str(captured)], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(captured.read_text()), odd


@pytest.mark.e2e
def test_the_node_whose_labels_do_not_fit_is_named_and_left_out(own_data_run):
    out, received, _ = own_data_run
    rows = metrics_rows(out)
    first = rows[0]
    assert first["data/nodes_ok"] == 2 and first["data/nodes_excluded"] == 1
    (excluded,) = first["data/excluded"]
    assert excluded["partition"] == 2
    assert "2_phone.jsonl" in excluded["reason"] and "'neutral' not in data.labels" in excluded["reason"]
    assert sorted(c["partition"] for c in first["data/clients"]) == [0, 1]
    for client in first["data/clients"]:
        assert client[DATA_SKIPPED_ROWS] == 0
        assert sum(client[DATA_LABEL_COUNTS]) == client[DATA_TRAIN_ROWS] + client[DATA_VAL_ROWS] == 160
    # The run completed on the other two: both rounds trained exactly them, none failed.
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients/sampled"] == 2 and row["clients/failed"] == 0
    trains = [m for m in received if m.get("type") == "train"]
    assert len(trains) == 4 and all(DATA_SKIPPED_ROWS in m["metrics"]["metrics"] for m in trains)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.e2e
def test_a_server_without_data_reports_federated_evaluation(own_data_run):
    out, _, _ = own_data_run
    rows = metrics_rows(out)
    assert rows[0]["global/accuracy"] is None  # no server data and no federated evaluation before round 1
    for row in rows[1:]:
        assert row["global/accuracy"] == row["federated/accuracy"]
        assert row["global/loss"] == row["federated/loss"]
        assert row["global/accuracy"] is not None
        assert row.get("barrier/jensen_factor") is None  # the server's diagnostics need server data
    assert "the server holds no data" in (out / "report.md").read_text()


@pytest.mark.e2e
def test_every_message_the_server_receives_carries_numbers_only(own_data_run):
    _, received, odd = own_data_run
    assert not [m for m in received if "error" in m]
    assert {m["type"] for m in received} >= {"query.data_summary", "train", "evaluate"}
    numbers = {"int", "float"}
    for message in received:
        for record in message["metrics"].values():
            for key, kind in record.items():
                kinds = set(kind) if isinstance(kind, list) else {kind}
                assert kinds <= numbers, (message["type"], key, kind)
        # Strings travel only as the data check's reason, and it quotes no example text.
        assert set(message["configs"]) <= {protocol.DATA_CHECK}, message["configs"]
        for record in message["configs"].values():
            assert set(record) == {protocol.REASON}
            assert not any(row["sentence"] in record[protocol.REASON] for row in odd)
    assert sum(protocol.DATA_CHECK in m["configs"] for m in received) == 1


def _summary_reply(node: int, metrics: dict, reason: str | None = None) -> Message:
    from flwr.app import MetricRecord

    content = RecordDict({protocol.METRICS: MetricRecord(metrics)})
    if reason is not None:
        content[protocol.DATA_CHECK] = ConfigRecord({protocol.REASON: reason})
    return message_from(content, protocol.QUERY_DATA_SUMMARY, src_node_id=node, group_id="0")


class SummaryGrid:
    """Answers the data-summary query with fixed replies: node 1 fits, nodes 2 and 3 do not."""

    def get_node_ids(self):
        return [1, 2, 3]

    def send_and_receive(self, messages, timeout=None):
        assert {m.metadata.message_type for m in messages} == {protocol.QUERY_DATA_SUMMARY}
        ok = {protocol.PARTITION_ID: 0, DATA_TRAIN_ROWS: 90, DATA_VAL_ROWS: 10, DATA_LABEL_COUNTS: [40, 60]}
        return [
            _summary_reply(1, ok),
            _summary_reply(2, {protocol.PARTITION_ID: 1}, "b.csv: missing columns ['label']"),
            _summary_reply(3, {protocol.PARTITION_ID: 2}, "c.jsonl: the file holds no rows."),
        ]


def test_the_data_check_names_every_left_out_node_and_stops_below_the_minimum(run_identity):
    from server.data_check import NodeDataError, check_node_data

    config = tiny_config(**{"data.labels": "a,b", "federation.min-train-nodes": 1})
    check = check_node_data(SummaryGrid(), config)  # type: ignore[arg-type]
    assert check.excluded == {2, 3}
    assert check.metrics["data/nodes_ok"] == 1 and check.metrics["data/nodes_excluded"] == 2
    assert check.metrics["data/clients"] == [
        {"node": 1, "partition": 0, DATA_TRAIN_ROWS: 90, DATA_VAL_ROWS: 10, DATA_LABEL_COUNTS: [40, 60]}
    ]
    config.federation.min_train_nodes = 2
    with pytest.raises(NodeDataError, match=r"1 node\(s\) hold data.*min-train-nodes=2.*missing columns.*no rows"):
        check_node_data(SummaryGrid(), config)  # type: ignore[arg-type]
