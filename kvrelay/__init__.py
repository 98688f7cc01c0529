"""kvrelay: what a user imports and runs. The client SDK (`from kvrelay import Client, AsyncClient`), the `kvrelay`
command (cli), the launcher, the load generator, typed settings, and the torch-free runtime the processes share
(rpc/, sampling, model_config, trace, settings). `kvrelay/v1` (public) and `kvrelay/internal/v1` (worker APIs) are
generated from protos/."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrelay.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import kvrelay.settings` in a worker does not load the client and its channel code.
    if name in __all__:
        from kvrelay import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvrelay' has no attribute {name!r}")
