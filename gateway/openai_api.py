"""The OpenAI embeddings API's JSON, read into taskmux's messages and written from them.

No HTTP here (gateway/openai_http.py serves it). What is supported, in OpenAI's terms:

    POST /v1/embeddings  input: a string or a list of strings (token arrays: 400)
                         model: the encoder's name as ListTasks reports it, that name
                                after any "org/" prefix, or the embedding head's name;
                                absent or null means the encoder (unknown: 404)
                         encoding_format: "float" (default) or "base64" (little-endian
                                float32, as OpenAI sends it)
                         dimensions: absent, null, or the encoder's own dimension (400
                                otherwise: vectors are never shortened)
                         user and any other field: ignored
    GET /v1/models, GET /v1/models/{id}: the encoder, as OpenAI lists models

`usage` counts are 0: workers tokenize, and they do not report token counts.
Errors are OpenAI's body, {"error": {"message", "type", "param", "code"}}, with the HTTP
status of the gRPC status the same call would get (gateway/errors.py `http_status`).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

import grpc
from taskmux_api.kinds import TASKS, TaskKind
from taskmux_api.v1 import taskmux_pb2 as pb

from gateway.errors import (
    InvalidArgument,
    NotFound,
    TaskmuxError,
    Unavailable,
    Undecodable,
    http_status,
)
from model.manifest import EncoderSpec, Manifest

ENCODING_FORMATS = ("float", "base64")
OWNER = "taskmux"

# OpenAI's error `type` for each gRPC status the endpoint answers with; others: server_error.
ERROR_TYPES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_request_error",
    grpc.StatusCode.NOT_FOUND: "invalid_request_error",
    grpc.StatusCode.UNAUTHENTICATED: "authentication_error",
    grpc.StatusCode.PERMISSION_DENIED: "permission_error",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_error",
}


class InvalidParam(InvalidArgument):
    """A field of the OpenAI request that taskmux cannot serve; `param` names it."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(NotFound):
    """The request names a model this gateway does not serve."""

    param = "model"
    openai_code = "model_not_found"


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A POST /v1/embeddings body, checked for shape (limits are the servicer's)."""

    texts: list[str]
    model: str
    encoding_format: str
    dimensions: int | None


@dataclass(frozen=True)
class Unservable(Undecodable):
    """A body the endpoint cannot serve (bad JSON or fields, an unknown model), handed to
    the handler stack as gRPC hands it a request that does not parse: the stack raises
    `problem` inside the API-key layer, so the caller is authenticated first, then
    answered and counted as for any other status."""

    problem: TaskmuxError
    request_id: str = ""  # the X-Request-Id header, for the access log

    def error(self) -> TaskmuxError:
        return self.problem


def parse_embeddings(raw: bytes) -> EmbeddingsRequest:
    """The request in a body, or InvalidParam saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidParam(None, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidParam(None, "the body must be a JSON object with 'input' and 'model'")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParam("model", "model must be a string")
    encoding_format = body.get("encoding_format")
    if encoding_format is not None and encoding_format not in ENCODING_FORMATS:
        raise InvalidParam(
            "encoding_format",
            f"encoding_format {encoding_format!r} is not supported: use 'float' or 'base64'",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise InvalidParam("dimensions", "dimensions must be an integer")
    return EmbeddingsRequest(
        _texts(body.get("input")), model or "", encoding_format or "float", dimensions
    )


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value is None:
        raise InvalidParam("input", "input is required: a string or a list of strings")
    if not isinstance(value, list):
        raise InvalidParam("input", "input must be a string or a list of strings")
    if not value:
        raise InvalidParam("input", "input is empty: send at least one string")
    if not all(isinstance(text, str) for text in value):
        raise InvalidParam(
            "input", "input must be a string or a list of strings; token arrays are not supported"
        )
    return value


def served_encoder(catalog: Manifest | None) -> EncoderSpec:
    """The encoder the workers serve; Unavailable before any worker registered."""
    if catalog is None:
        raise Unavailable("no worker has registered its heads yet: start a worker, then retry")
    return catalog.encoder


def resolve_model(request: EmbeddingsRequest, catalog: Manifest | None) -> EncoderSpec:
    """The encoder the request's model and dimensions name; ModelNotFound or InvalidParam."""
    encoder = served_encoder(catalog)
    name = request.model
    if name and name.rsplit("/", 1)[-1] != encoder.name and name != embedding_head():
        raise ModelNotFound(
            f"model {name!r} is not served here; the only model is {encoder.name!r} "
            "(GET /v1/models)"
        )
    if request.dimensions is not None and request.dimensions != encoder.dimension:
        raise InvalidParam(
            "dimensions",
            f"dimensions {request.dimensions} is not supported: {encoder.name!r} makes "
            f"{encoder.dimension}-dimensional vectors and does not shorten them",
        )
    return encoder


def embedding_head() -> str:
    """The head every worker serves for Embed, which `model` may name too."""
    return TASKS[TaskKind.EMBED].default_head


def embeddings_body(response: pb.EmbedResponse, model: str, encoding_format: str) -> dict[str, Any]:
    """OpenAI's response body for an EmbedResponse."""
    encode = _base64 if encoding_format == "base64" else list
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(e.values)}
            for i, e in enumerate(response.embeddings)
        ],
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def _base64(values: Any) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def model_body(encoder: EncoderSpec) -> dict[str, Any]:
    """One entry of GET /v1/models."""
    return {"id": encoder.name, "object": "model", "created": 0, "owned_by": OWNER}


def models_body(encoder: EncoderSpec) -> dict[str, Any]:
    """GET /v1/models: the encoder, the one model there is."""
    return {"object": "list", "data": [model_body(encoder)]}


def error_body(
    code: grpc.StatusCode, message: str, error: TaskmuxError | None = None
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error body for a call that ended with gRPC status `code`;
    `error`, when the gateway raised it, may name the request field at fault."""
    return http_status(code), {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(code, "server_error"),
            "param": getattr(error, "param", None),
            "code": getattr(error, "openai_code", None) or code.name.lower(),
        }
    }
