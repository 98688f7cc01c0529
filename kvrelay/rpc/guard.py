"""Every kvrelay server's last line: no request ends with UNKNOWN, whatever it holds or whatever fails under it.

gRPC answers UNKNOWN (and logs a traceback) in two cases a client should never see:

- a request whose bytes do not parse (invalid UTF-8 in a string field, a truncated or foreign message): gRPC's
  deserializer raises before any handler runs. Here the deserializer is wrapped: it returns an `Undecodable` in
  place of the message, and the handler answers INVALID_ARGUMENT with what protobuf said, without a traceback;
- an exception a handler did not turn into a status. A Redis error (Redis down, slow, or its connections all busy
  for longer than the store's pool timeout) becomes UNAVAILABLE, "retry", with one log line; a failed gRPC call of
  the handler's own (the gateway's to a worker) passes its status on (UNKNOWN as INTERNAL); anything else is a bug
  and becomes INTERNAL, logged with its traceback.

Installed by `kvrelay.rpc.grpc_server.start_server` as a server interceptor, so it covers every service of every
process (gateway, prefill, decode, colocated, kvstore) without touching the generated code. Client-streaming methods
(reflection) are passed through untouched: kvrelay defines none of its own.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from redis.exceptions import RedisError

log = logging.getLogger("kvrelay.rpc")


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    message: str


def _type_name(deserializer: Callable) -> str:
    owner = getattr(deserializer, "__self__", None)  # GenerateRequest.FromString -> GenerateRequest
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "request"


def tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """A deserializer that never raises: bytes that do not parse give an Undecodable saying why."""
    name = _type_name(deserializer)

    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            return Undecodable(f"cannot decode the request as {name} ({len(data)} bytes): {reason}")

    return deserialize


async def answer(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """The status for an exception a handler let out (context.abort raises; this returns only when the call is over
    already: the client cancelled it, and a send that failed because of that is no error)."""
    if context.cancelled() or isinstance(exc, grpc.aio.InternalError):
        # InternalError (ExecuteBatchError): gRPC could not send because the call is over, the client having cancelled
        # it a moment before (the gateway cancels a Decode call when a stop string matches); cancelled() may not
        # know yet. Nobody is left to answer.
        log.debug("%s: %s: %s after the call ended", method, type(exc).__name__, exc)
        return
    if isinstance(exc, grpc.aio.AioRpcError):  # a call of its own failed (the gateway's to a worker): pass it on
        code = exc.code()
        await context.abort(grpc.StatusCode.INTERNAL if code == grpc.StatusCode.UNKNOWN else code, exc.details())
    if isinstance(exc, RedisError):
        log.warning("%s: Redis failed: %s: %s", method, type(exc).__name__, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"Redis is unavailable ({type(exc).__name__}: {exc}); retry")
    log.exception("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}: {exc}")


def guard_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler with a tolerant deserializer and exceptions turned into statuses (unary requests only)."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    if handler.response_streaming:
        behavior = handler.unary_stream
        if inspect.isasyncgenfunction(behavior):

            async def stream(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                try:
                    async for response in behavior(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await answer(exc, context, method)

            wrapped = stream
        elif inspect.iscoroutinefunction(behavior):
            wrapped = _coroutine(behavior, method)
        else:
            return handler
        return handler._replace(request_deserializer=tolerant(handler.request_deserializer), unary_stream=wrapped)
    behavior = handler.unary_unary
    if not inspect.iscoroutinefunction(behavior):
        return handler
    return handler._replace(
        request_deserializer=tolerant(handler.request_deserializer), unary_unary=_coroutine(behavior, method)
    )


def _coroutine(behavior: Callable, method: str) -> Callable:
    async def call(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await answer(exc, context, method)

    return call


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler with guard_handler (see the module docstring)."""

    def __init__(self) -> None:
        # method -> (the handler, its guarded version): built once per method, not per call
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is None or known[0] is not handler:
            known = self._guarded[method] = (handler, guard_handler(handler, method))
        return known[1]
