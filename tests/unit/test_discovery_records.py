"""The znode records (services/core/discovery/records.py): the bytes on the wire are those the
processes wrote before the records existed, unknown fields are ignored, missing ones default,
and malformed data raises RecordError."""

from __future__ import annotations

import json

import pytest

from services.core.discovery.records import (
    FrontendRecord,
    HeldPartition,
    LoadError,
    ModelPointer,
    NodeRecord,
    PartitionError,
    RecordError,
    VersionRecord,
)
from services.core.errors import ConfigError


def wire(obj: dict) -> bytes:
    """How the shard, the frontend and the store encoded a znode before the records."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# A shard's znode as main.py's node_data() wrote it (docs/zookeeper.md's example).
OLD_NODE = {
    "node_id": "shard-1",
    "address": "10.0.0.7:50051",
    "partitions": ["items/1", "tags/0", "users/0"],
    "held": {
        "items/1of2": {"bytes": 163840, "lookups": 5120, "ids": 231000, "ids_per_s": 412.5},
        "tags/0of1": {"bytes": 19200, "lookups": 5120, "ids": 88000, "ids_per_s": 0.0},
    },
    "memory_bytes": 183040,
    "versions_ready": [1, 2],
    "serving_version": 2,
    "map_version": 3,
    "overlay_bytes": 181248,
    "pid": 4242,
    "loading": None,
    "load_error": {"version": 3, "error": "checksum mismatch"},
    "target_map_version": 4,
    "partitions_loading": ["users/0of1", "items/0of1"],
    "partitions_draining": [],
    "partition_error": None,
}


def test_node_record_reads_and_writes_the_bytes_of_before():
    record = NodeRecord.from_bytes(wire(OLD_NODE))
    assert record.address == "10.0.0.7:50051" and record.versions_ready == (1, 2)
    assert record.held["items/1of2"] == HeldPartition(size_bytes=163840, lookups=5120, ids=231000, ids_per_s=412.5)
    assert record.load_error == LoadError(3, "checksum mismatch") and record.partition_error is None
    assert record.partitions_loading == ("users/0of1", "items/0of1")  # the writer's order: the one loading first
    assert record.to_bytes() == wire(OLD_NODE)
    assert json.loads(record.to_bytes()) == OLD_NODE


def test_node_record_ignores_unknown_fields_and_defaults_missing_ones():
    newer = NodeRecord.from_bytes(wire({**OLD_NODE, "zone": "eu-1", "held": {"a/0of1": {"bytes": 1, "temperature": 3}}}))
    assert newer.address == OLD_NODE["address"] and newer.held == {"a/0of1": HeldPartition(size_bytes=1)}
    older = NodeRecord.from_bytes(wire({"node_id": "shard-0", "versions_ready": [1]}))
    assert older == NodeRecord(node_id="shard-0", versions_ready=(1,))
    assert older.address == "" and older.serving_version is None and older.held == {} and older.load_error is None
    assert NodeRecord.from_bytes(b'{"loading": null, "partition_error": null}') == NodeRecord()


def test_instance_id_is_written_only_when_set():
    node = NodeRecord.from_bytes(wire({**OLD_NODE, "instance_id": "9f2c"}))
    assert node.instance_id == "9f2c" and json.loads(node.to_bytes()) == {**OLD_NODE, "instance_id": "9f2c"}
    assert NodeRecord.from_bytes(wire(OLD_NODE)).instance_id == ""  # an older writer
    frontend = FrontendRecord("fe", "h:1", 2, 7, instance_id="ab12")
    assert FrontendRecord.from_bytes(frontend.to_bytes()) == frontend
    assert FrontendRecord("fe", "h:1", 2, 7).to_bytes() == wire({"frontend_id": "fe", "address": "h:1", "version": 2, "pid": 7})
    with pytest.raises(RecordError, match="'instance_id'"):
        NodeRecord.from_bytes(wire({"instance_id": 7}))


@pytest.mark.parametrize("data, field", [
    (b"garbage", "valid JSON"),
    (b"\xff\xfe", "valid JSON"),
    (b"[1, 2]", "JSON object"),
    (wire({"address": 5}), "'address'"),
    (wire({"versions_ready": "1"}), "'versions_ready'"),
    (wire({"versions_ready": [1, "2"]}), "'versions_ready'"),
    (wire({"versions_ready": [True]}), "'versions_ready'"),
    (wire({"held": ["items/0of1"]}), "'held'"),
    (wire({"held": {"items/0of1": 7}}), "items/0of1"),
    (wire({"held": {"items/0of1": {"ids_per_s": "fast"}}}), "'ids_per_s'"),
    (wire({"load_error": {"error": "no version"}}), "'version'"),
    (wire({"partition_error": "boom"}), "'partition_error'"),
    (wire({"serving_version": 1.5}), "'serving_version'"),
])
def test_malformed_node_records_raise_record_error(data, field):
    with pytest.raises(RecordError, match=field) as e:
        NodeRecord.from_bytes(data, where="/shardrec/c/nodes/shard-0")
    assert isinstance(e.value, ConfigError) and "/shardrec/c/nodes/shard-0" in str(e.value)


def test_frontend_record_bytes_of_before():
    old = {"frontend_id": "frontend", "address": "127.0.0.1:8500", "version": 2, "pid": 4343}
    record = FrontendRecord.from_bytes(wire(old))
    assert record == FrontendRecord("frontend", "127.0.0.1:8500", 2, 4343)
    assert record.to_bytes() == wire(old)
    assert FrontendRecord.from_bytes(wire({"address": "h:2", "version": 1})) == FrontendRecord(address="h:2", version=1)
    with pytest.raises(RecordError, match="'version'"):
        FrontendRecord.from_bytes(wire({"version": "1"}))


def test_model_pointer_and_version_records():
    assert ModelPointer("file:///ckpt", "demo").to_bytes() == wire({"uri": "file:///ckpt", "name": "demo"})
    assert ModelPointer.from_bytes(wire({"uri": "file:///ckpt", "name": "demo", "extra": 1})) == ModelPointer("file:///ckpt", "demo")
    with pytest.raises(RecordError, match="uri"):
        ModelPointer.from_bytes(wire({"name": "demo"}))
    assert VersionRecord(3).to_bytes() == wire({"version": 3})
    assert VersionRecord.from_bytes(b'{"version": 7}') == VersionRecord(7)
    for bad in (b"{}", b'{"version": "7"}', b"7", b"nope"):
        with pytest.raises(RecordError):
            VersionRecord.from_bytes(bad)
