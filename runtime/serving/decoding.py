"""Request messages that do not parse. gRPC's generated code parses each request before the
handler runs, and a parse failure ends the call (or the whole stream) with UNKNOWN and a logged
traceback. Here the servicers are registered with a tolerant parser instead: a message that does
not parse arrives as :class:`Undecodable`, a unary call answers ``INVALID_ARGUMENT``, and a
stream reports that message in-band (by its index) and goes on. Each logs one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from specserve.runtime.errors import InvalidInputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """A request message that could not be parsed."""

    message_type: str
    size: int
    reason: str

    def error(self, peer: str = "", where: str = "") -> InvalidInputError:
        """The client's error, logged once (no traceback)."""
        log.warning("undecodable %s (%d bytes)%s%s: %s", self.message_type, self.size,
                    f" from {peer}" if peer else "", f" {where}" if where else "", self.reason)
        return InvalidInputError(f"undecodable {self.message_type} ({self.size} bytes): {self.reason}")


def _tolerant(parse: Callable[[bytes], object], message_type: str) -> Callable[[bytes], object]:
    def parse_or_report(data: bytes) -> object:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: the client's fault
            return Undecodable(message_type, len(data), str(exc) or type(exc).__name__)

    return parse_or_report


class _Capture:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` registers its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def add_tolerant_servicer(add_to_server: Callable, servicer, server: grpc.aio.Server) -> None:
    """``add_to_server(servicer, server)`` (a generated registration function), with every
    method's request parser made tolerant (:class:`Undecodable` instead of an exception)."""
    capture = _Capture()
    add_to_server(servicer, capture)
    if not capture.service:
        raise RuntimeError(f"{add_to_server.__name__} registered no service")
    handlers = {}
    for method, handler in capture.handlers.items():
        parse = handler.request_deserializer
        message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        name = message_type.full_name if message_type is not None else f"{capture.service}/{method} request"
        handlers[method] = handler._replace(request_deserializer=_tolerant(parse, name)) if parse else handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)
