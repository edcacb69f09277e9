"""The OpenAPI document of the frontend's REST endpoint (docs/http.md), built from the proto
descriptors of ``recommend.proto`` so it follows the messages: each field under its proto3 JSON
name, int64 as the mapping writes it (a decimal string; requests may also send a number).

``document()`` is served at ``/openapi.json`` and committed as docs/openapi.json
(``tools/gen_openapi.py`` writes it; a test keeps the two equal).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from services._proto.shardrec.v1 import recommend_pb2

TIMEOUT_HEADER = "X-Shardrec-Timeout-Ms"
CALLER_HEADER = "X-Shardrec-Caller"
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64,
          FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}  # fmt: skip
_INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
          FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}  # fmt: skip
_ERRORS = {
    "400": "INVALID_ARGUMENT (a bad field: details carry a google.rpc.BadRequest) or FAILED_PRECONDITION",
    "401": "UNAUTHENTICATED: no bearer token, or one this frontend does not know",
    "403": "PERMISSION_DENIED: the token may not call this endpoint",
    "413": "the body is over the frontend's receive cap",
    "429": "RESOURCE_EXHAUSTED: shed by admission control or over a limit; Retry-After and a google.rpc.RetryInfo say when to retry",
    "500": "INTERNAL: a bug, logged under the incident id in the message",
    "503": "UNAVAILABLE: no live replica, or the frontend is not ready",
    "504": "DEADLINE_EXCEEDED: the request did not finish within its deadline",
}


def _scalar(field: FieldDescriptor, *, request: bool) -> dict[str, Any]:
    t = field.type
    if t in _INT64:
        string = {"type": "string", "pattern": "^-?[0-9]+$", "format": "int64"}
        return {"oneOf": [{"type": "integer", "format": "int64"}, string]} if request else string
    if t in _INT32:
        return {"type": "integer", "format": "int32"}
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return {"type": "number", "format": "float" if t == FieldDescriptor.TYPE_FLOAT else "double"}
    if t == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if t == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if t == FieldDescriptor.TYPE_ENUM:
        return {"$ref": f"#/components/schemas/{field.enum_type.name}"}
    if t == FieldDescriptor.TYPE_MESSAGE:
        return {"$ref": f"#/components/schemas/{field.message_type.name}"}
    raise TypeError(f"no JSON schema for field {field.full_name} of type {t}")


def _field(field: FieldDescriptor, *, request: bool) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _scalar(value, request=request)}
    schema = _scalar(field, request=request)
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def _message(message: Descriptor, *, request: bool) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {f.json_name: _field(f, request=request) for f in message.fields},
    }


def _enum(enum: EnumDescriptor) -> dict[str, Any]:
    return {"type": "string", "enum": [v.name for v in enum.values]}


def _error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "status"],
                "properties": {
                    "code": {"type": "integer", "description": "the HTTP code"},
                    "message": {"type": "string"},
                    "status": {"type": "string", "description": "the gRPC status name, e.g. RESOURCE_EXHAUSTED"},
                    "details": {
                        "type": "array",
                        "description": "google.rpc details in their JSON form (RetryInfo, BadRequest), each with '@type'",
                        "items": {"type": "object"},
                    },
                },
            }
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the REST endpoint."""
    pb = recommend_pb2
    schemas: dict[str, Any] = {
        "RecommendRequest": _message(pb.RecommendRequest.DESCRIPTOR, request=True),
        "SparseFeature": _message(pb.SparseFeature.DESCRIPTOR, request=True),
        "RecommendResponse": _message(pb.RecommendResponse.DESCRIPTOR, request=False),
        "ScoredItem": _message(pb.ScoredItem.DESCRIPTOR, request=False),
        "DegradedReason": _enum(pb.DegradedReason.DESCRIPTOR),
        "Error": _error_schema(),
        "Health": {"type": "object", "properties": {"status": {"type": "string"}}},
    }
    errors = {
        code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for code, text in _ERRORS.items()
    }
    errors["429"]["headers"] = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
    health = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "shardrec Recommender",
            "version": "v1",
            "description": "Recommend over HTTP/JSON: the proto3 JSON mapping of shardrec.v1.RecommendRequest and "
            "RecommendResponse (docs/http.md). Same validation, limits, batching and answers as the gRPC API.",
        },
        "paths": {
            "/v1/recommend": {
                "post": {
                    "operationId": "recommend",
                    "summary": "Rank the candidate items for one user",
                    "parameters": [
                        {"name": TIMEOUT_HEADER, "in": "header", "required": False,
                         "description": "the request's deadline in milliseconds (default: the frontend's --default-timeout-ms)",
                         "schema": {"type": "number", "exclusiveMinimum": True, "minimum": 0}},
                        {"name": CALLER_HEADER, "in": "header", "required": False,
                         "description": "caller identity for per-caller limits, trusted only while authentication is off",
                         "schema": {"type": "string"}},
                    ],  # fmt: skip
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RecommendRequest"}}},
                    },
                    "responses": {
                        "200": {
                            "description": "the top-k candidates, score descending",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RecommendResponse"}}},
                        },
                        **errors,
                    },
                    "security": [{}, {"bearerAuth": []}],
                }
            },
            "/healthz": {"get": {"operationId": "healthz", "summary": "liveness: the process answers",
                                 "responses": {"200": {"description": "alive", **health}}}},
            "/readyz": {"get": {"operationId": "readyz",
                                "summary": "readiness: the gRPC health status of shardrec.v1.Recommender is SERVING",
                                "responses": {"200": {"description": "serving", **health},
                                              "503": {"description": "not serving", **health}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "this document",
                                      "responses": {"200": {"description": "the OpenAPI document",
                                                            "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },  # fmt: skip
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "a caller token (docs/security.md)"}},
        },
    }
