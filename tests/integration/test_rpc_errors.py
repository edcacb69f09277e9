"""The error edge (``services.core.rpc.errors``) on real gRPC servers, sync and asyncio: a
ShardrecError keeps its code and message (and RetryInfo when it names a delay); anything else is
INTERNAL "internal error, id X" with no exception text."""

import asyncio
from concurrent import futures

import grpc
import pytest

from services.core.errors import InvalidArgumentError, ResourceExhaustedError
from services.core.rpc.errors import handle_errors, retry_delay_s

METHOD = "/test.Errors/Raise"


class Raiser:
    @handle_errors
    def sync(self, request: bytes, context) -> bytes:
        raise _ERRORS[request]()

    @handle_errors
    async def aio(self, request: bytes, context) -> bytes:
        raise _ERRORS[request]()


_ERRORS = {
    b"shed": lambda: ResourceExhaustedError("frontend overloaded", retry_after_s=0.25),
    b"bad": lambda: InvalidArgumentError("top_k = 0 must be between 1 and 3"),
    b"bug": lambda: ValueError("secret detail of a bug"),
}


def _handler(fn):
    ident = lambda b: b  # noqa: E731 - raw bytes in and out
    return grpc.method_handlers_generic_handler(
        "test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(fn, request_deserializer=ident, response_serializer=ident)}
    )


def _call(port: int, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(METHOD)(payload, timeout=5)
    return info.value


def _check(port: int) -> None:
    e = _call(port, b"shed")
    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and e.details() == "frontend overloaded"
    assert retry_delay_s(e) == pytest.approx(0.25)
    e = _call(port, b"bad")
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "top_k = 0" in e.details()
    assert retry_delay_s(e) is None
    e = _call(port, b"bug")
    assert e.code() is grpc.StatusCode.INTERNAL
    assert e.details().startswith("internal error, id ") and "secret" not in e.details() and "ValueError" not in e.details()


def test_sync_server_statuses():
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((_handler(Raiser().sync),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _check(port)
    finally:
        server.stop(0)


def test_aio_server_statuses():
    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(Raiser().aio),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, _check, port)
        finally:
            await server.stop(0)

    asyncio.run(main())
