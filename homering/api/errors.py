"""The API's errors: OpenAI error objects (``{"error": {"message", "type", "param", "code"}}``), the handlers that
turn every failure into one, and the API key check.

Statuses: 400 bad request, 401 a missing or wrong API key, 404 unknown model (or route, or window file), 405 a
method the route does not have (with ``Allow``), 413 the prompt does not fit the context, 429 the queue is full,
500 the cluster failed the request, 503 no plan is ready. FastAPI's 422 for request validation errors is a 400
here, as in OpenAI's API.
"""

from __future__ import annotations

import hmac

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "server_error",
}
"""The error object's ``type`` per HTTP status (OpenAI's names); other statuses are ``invalid_request_error``."""


class ApiError(Exception):
    """An error answered as an OpenAI error object with HTTP ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as a JSON response: ``{"error": {"message", "type", "param", "code"}}``."""
        return JSONResponse(
            status_code=self.status,
            headers=self.headers,
            content={
                "error": {
                    "message": self.message,
                    "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                    "param": self.param,
                    "code": self.code,
                }
            },
        )


def install_error_handlers(app: FastAPI) -> None:
    """Make ``app`` answer every error as an error object: :class:`ApiError`, request validation (400, with
    the first error's field as ``param``), Starlette's HTTP errors (404, 405 with its ``Allow``) and, for a bug,
    500."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        if first.get("type") == "invalid_unicode":
            where = first["ctx"]["where"]
            return ApiError(400, first["msg"], param=where.split(".")[0]).response()
        return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        # keep the exception's headers: a 405's Allow (RFC 9110 requires it) lists the route's methods
        return ApiError(
            exc.status_code,
            str(exc.detail),
            code="not_found" if exc.status_code == 404 else None,
            headers=dict(exc.headers) if exc.headers else None,
        ).response()

    @app.exception_handler(Exception)
    async def _crash(_request: Request, _exc: Exception):
        # a bug: answer the error object the document promises rather than Starlette's text/plain page
        # (Starlette raises the exception again after answering, and uvicorn logs it with its traceback)
        return ApiError(500, "the server failed to answer the request").response()


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: require ``Authorization: Bearer <key>`` when the app has a key.

    The key is ``request.app.state.api_key`` (None or unset: every request
    passes). Add it to a route or router with ``dependencies=[Depends(require_api_key)]``.

    Raises:
        ApiError: 401 ``invalid_api_key``, the header is missing or the key is wrong.
    """
    key: str | None = getattr(request.app.state, "api_key", None)
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "you did not provide an API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers=challenge,
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key", headers=challenge)
