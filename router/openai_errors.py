"""The OpenAI-compatible API's errors: the router's errors as HTTP statuses and OpenAI error
objects, `{"error": {"message", "type", "param", "code"}}`.

The same `RouterError`s the gRPC servicer maps to status codes (router/errors.py), here by
that code:

    INVALID_ARGUMENT   400 invalid_request_error   param: the request field, in the API's names
    ALREADY_EXISTS     409 invalid_request_error
    RESOURCE_EXHAUSTED 429 rate_limit_error        queue or KV cache full: retry later
    UNAVAILABLE        503 service_unavailable_error  no live instance, draining, a worker failed
    DEADLINE_EXCEEDED  504 timeout_error           server.request_timeout_s passed
    INTERNAL           500 internal_error          a bug: the message holds an error id only

and, decided by the HTTP app itself: 401 (no or a wrong token), 404 (another model's name),
413 (a body over the size bound). Messages are the router's own, never an exception's text.
"""

from __future__ import annotations

import grpc
from pydantic import ValidationError

from router.errors import InvalidRequestError, RouterError, status_code_for

_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "duplicate_request"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "server_overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
    grpc.StatusCode.INTERNAL: (500, "internal_error", None),
}
# The validator's field names (the gRPC request's) as the OpenAI API names them.
_PARAM_NAMES = {"prompt_token_ids": "prompt", "sampling.max_tokens": "max_tokens"}


class ApiError(Exception):
    """An HTTP error response: status and the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, type_: str, param: str | None,
                 code: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code


def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param,
                      "code": error.code}}


def from_router_error(error: RouterError, input_param: str) -> ApiError:
    """`error` (client-safe already) as an HTTP error; `input_param` names the endpoint's input
    ("prompt" or "messages") for errors about the request's input as a whole."""
    status, type_, code = _BY_CODE.get(status_code_for(error), (500, "internal_error", None))
    param = None
    if isinstance(error, InvalidRequestError):
        param = api_param(error.field, input_param)
    return ApiError(status, _message(error, param), type_, param, code)


def api_param(field: str, input_param: str) -> str:
    """The OpenAI API's name of a validator's field (`sampling.top_p` -> `top_p`)."""
    if field == "input":
        return input_param
    field = _PARAM_NAMES.get(field, field)
    return field.removeprefix("sampling.")


def _message(error: RouterError, param: str | None) -> str:
    """The router's message, with the field named as the API names it."""
    text = str(error)
    if isinstance(error, InvalidRequestError) and param is not None:
        text = param + text.removeprefix(error.field)
    return text


def from_validation_error(error: ValidationError) -> InvalidRequestError:
    """The first problem pydantic found in a request body, naming its field."""
    first = error.errors(include_url=False, include_input=False)[0]
    if first["type"] == "json_invalid":
        return InvalidRequestError("body", "is not valid JSON")
    if first["type"] == "model_type" and not first["loc"]:
        return InvalidRequestError("body", "must be a JSON object")
    return InvalidRequestError(_loc_path(first["loc"]), first["msg"])


def _loc_path(loc: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content"; union branches' type names dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _is_type_name(part):
            break  # pydantic names the union member it tried: `stop.str`, `prompt.list[int]`
        else:
            path += ("." if path else "") + part
    return path or "body"


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part.startswith(
        ("function-", "list", "dict", "StreamOptions", "ContentPart"))
