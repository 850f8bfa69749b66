"""The client room: the ``specserve.v1`` client, catalogue writers and the folder watcher. It
imports only the runtime core, the protos and grpc (never the engine, onnxruntime or prometheus)."""

from specserve.runtime.catalogue import Row
from specserve.runtime.client.client import DEFAULT_ADDRESS, Client, Credentials, StreamError

__all__ = ["DEFAULT_ADDRESS", "Client", "Credentials", "Row", "StreamError"]
