"""The committed docs/openapi.json is what the frontend serves (``openapi.document()``), and the
document describes every field of the messages under its proto3 JSON name."""

from __future__ import annotations

import importlib.util
import json
import pathlib

from google.protobuf import json_format

from services._proto.shardrec.v1 import recommend_pb2
from services.frontend.openapi import document

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_committed_document_is_the_served_one():
    spec = importlib.util.spec_from_file_location("gen_openapi", ROOT / "tools" / "gen_openapi.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    committed = (ROOT / "docs" / "openapi.json").read_text()
    assert committed == gen.render(), "docs/openapi.json is stale: run `python tools/gen_openapi.py`"
    assert json.loads(committed) == document()


def test_schemas_name_every_field_as_the_json_mapping_writes_it():
    schemas = document()["components"]["schemas"]
    resp = recommend_pb2.RecommendResponse(request_id="r", version=3, degraded=True,
                                           degraded_reasons=[recommend_pb2.DEGRADED_CANDIDATES_CAPPED])
    resp.items.add(item_id=7, score=0.5, position=1)
    as_json = json_format.MessageToDict(resp, always_print_fields_with_no_presence=True)
    assert set(as_json) == set(schemas["RecommendResponse"]["properties"])
    assert set(as_json["items"][0]) == set(schemas["ScoredItem"]["properties"])
    assert as_json["version"] == "3" and schemas["RecommendResponse"]["properties"]["version"]["type"] == "string"
    req_fields = {f.json_name for f in recommend_pb2.RecommendRequest.DESCRIPTOR.fields}
    assert req_fields == set(schemas["RecommendRequest"]["properties"])
