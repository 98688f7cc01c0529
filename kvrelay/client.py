"""Python clients of the kvrelay gateway: `AsyncClient` (asyncio) and `Client` (blocking), same methods.

from kvrelay.client import Client
with Client("127.0.0.1:50051") as c:
    for chunk in c.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
        print(chunk.text, end="", flush=True)

A gateway with API keys wants `api_key=`; one with TLS wants `tls=True` (the system's roots) or `tls_ca=` (a PEM file
of the CA that signed its certificate), and one that requires client certificates also `tls_cert=` and `tls_key=`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import AsyncIterator, Iterator

import grpc

from kvrelay.rpc.auth import bearer_metadata, client_tls_credentials, metadata_interceptors
from kvrelay.rpc.grpc_server import channel_options
from kvrelay.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def build_request(
    prompt: str | None = None,
    messages: list[dict] | None = None,
    prompt_token_ids: list[int] | None = None,
    max_tokens: int | None = None,
    stop: list[str] | None = None,
    session_id: str = "",
    request_id: str = "",
    logprobs: int | None = None,
    ignore_eos: bool = False,
    **sampling,
) -> gateway_pb2.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
    req = gateway_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=[gateway_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []],
        prompt_token_ids=prompt_token_ids or [],
        stop=stop or [],
        session_id=session_id,
        request_id=request_id,
        ignore_eos=ignore_eos,
        sampling=common_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None}),
    )
    if max_tokens is not None:
        req.max_tokens = max_tokens
    if logprobs is not None:
        req.logprobs = logprobs
    return req


PathLike = str | os.PathLike


def _tls(
    tls: bool, tls_ca: PathLike | None, tls_cert: PathLike | None, tls_key: PathLike | None
) -> grpc.ChannelCredentials | None:
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    return client_tls_credentials(tls_ca, tls_cert, tls_key)


class AsyncClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ) -> None:
        """api_key: sent as `authorization: Bearer <key>` with every call (also calls made on `self.stub`).
        tls / tls_ca / tls_cert / tls_key: TLS (any of them turns it on); tls_ca: trust this CA instead of the
        system's roots; tls_cert and tls_key: a client certificate, for a gateway that requires one."""
        interceptors = metadata_interceptors([bearer_metadata(api_key)]) if api_key else None
        credentials = _tls(tls, tls_ca, tls_cert, tls_key)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=channel_options(), interceptors=interceptors)
        else:
            self.channel = grpc.aio.secure_channel(
                address, credentials, options=channel_options(), interceptors=interceptors
            )
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    async def generate(self, *, timeout: float | None = None, **kwargs) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        """Streamed responses; the last carries `finish`. Raises grpc.aio.AioRpcError with the server's status.

        Leaving the loop early (break, an exception) cancels the call, so the server stops generating at once.
        """
        call = self.stub.Generate(build_request(**kwargs), timeout=timeout)
        try:
            async for message in call:
                yield message
        finally:
            # Not left to garbage collection: a grpc.aio call sits in a reference cycle with its own message
            # iterator, so it lives (and the server keeps generating) until the cyclic collector happens to run.
            call.cancel()

    async def complete(self, *, timeout: float | None = None, **kwargs) -> gateway_pb2.CompleteResponse:
        return await self.stub.Complete(build_request(**kwargs), timeout=timeout)

    async def model_info(self) -> gateway_pb2.ModelInfo:
        return await self.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest())

    async def status(self) -> gateway_pb2.StatusResponse:
        return await self.stub.GetStatus(gateway_pb2.GetStatusRequest())

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    pass


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the API key) to every call of a blocking channel."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def _details(self, d):
        metadata = [*(d.metadata or ()), *self.pairs]
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, getattr(d, "wait_for_ready", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class Client:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
    ) -> None:
        """The same arguments as AsyncClient's."""
        credentials = _tls(tls, tls_ca, tls_cert, tls_key)
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=channel_options())
        else:
            self.channel = grpc.secure_channel(address, credentials, options=channel_options())
        if api_key:
            self.channel = grpc.intercept_channel(self.channel, _AddMetadata([bearer_metadata(api_key)]))
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def generate(self, *, timeout: float | None = None, **kwargs) -> Iterator[gateway_pb2.GenerateResponse]:
        return self.stub.Generate(build_request(**kwargs), timeout=timeout)

    def complete(self, *, timeout: float | None = None, **kwargs) -> gateway_pb2.CompleteResponse:
        return self.stub.Complete(build_request(**kwargs), timeout=timeout)

    def model_info(self) -> gateway_pb2.ModelInfo:
        return self.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest())

    def status(self) -> gateway_pb2.StatusResponse:
        return self.stub.GetStatus(gateway_pb2.GetStatusRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
