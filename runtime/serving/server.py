"""The gRPC server: KServe v2 inference protocol, the ``specserve.v1`` domain API, health and
reflection, on grpc.aio with ONNX Runtime sessions run off the event loop.

This module assembles the room: the servicers (:mod:`.kserve`, :mod:`.domain`) only translate
protobuf <-> engine objects (:mod:`specserve.runtime.engine`). Domain errors become status codes in
one table (:mod:`.status`). Stream RPCs answer concurrently, in order, and report a bad message
in-band (:mod:`.streams`). Health is :mod:`.health`.

``create_server(repository, address)`` returns ``(server, port)``, so tests can bind port 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specserve.protos import specserve_pb2 as pb
from specserve.protos import specserve_pb2_grpc as pb_grpc
from specserve.protos.kserve import service_pb2 as kserve
from specserve.protos.kserve import service_pb2_grpc as kserve_grpc
from specserve.runtime.embedded.providers import Device, single_threaded_numpy
from specserve.runtime.engine import metrics
from specserve.runtime.engine.memory import RequestMemory, Trimmer, return_freed_memory
from specserve.runtime.engine.store import ModelStore
from specserve.runtime.errors import (
    SpecserveError,
)
from specserve.runtime.serving.decoding import add_tolerant_servicer
from specserve.runtime.serving.domain import DomainServicer
from specserve.runtime.serving.health import sync_health
from specserve.runtime.serving.kserve import KServeServicer
from specserve.runtime.serving.limits import MB, Limits, message_limit
from specserve.runtime.serving.security import AccessInterceptor, Security
from specserve.runtime.serving.status import hide_path

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.001
REFUSE_BEFORE_STOP_S = 1.0
"""On SIGTERM, how long the servicers answer new calls UNAVAILABLE before gRPC stops taking them."""

def create_server(repository: str | Path, address: str = "127.0.0.1:0",
                  device: Device | None = None, security: Security | None = None,
                  limits: Limits | None = None) -> tuple[grpc.aio.Server, int]:
    """A configured, not yet started grpc.aio server and the port it is bound to; the models'
    sessions run on ``device`` (default the CPU), each behind its batcher. ``security`` (default:
    none of TLS, tokens and reflection; model control off; loopback only) is checked here: an
    unprotected non-loopback address raises :class:`~.security.SecurityError`. ``limits``
    (:mod:`.limits`) bound what the server holds at once."""
    security = security or Security()
    limits = limits or Limits()
    host = address.rsplit(":", 1)[0]
    security.check_address(host)
    return_freed_memory()  # before the models load (glibc settings, see .engine.memory)
    log.info("%s (each request's preprocessing already has its own thread)", single_threaded_numpy())
    memory = RequestMemory(limits.max_queued_bytes)
    store = ModelStore(repository, device, memory)
    message_bytes = limits.max_message_bytes or message_limit(store.models.values())
    log.info("limits: %d calls at once, messages up to %.0f MB, %.0f MB of queued requests",
             limits.max_concurrent_rpcs, message_bytes / MB, limits.max_queued_bytes / MB)
    hide_path(repository, "<repository>")  # clients see names, never the server's filesystem
    server = grpc.aio.server(
        interceptors=[AccessInterceptor(security)] if security.tokens is not None else None,
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        options=[
            *limits.channel_options(message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ])
    stopping = asyncio.Event()  # set on SIGTERM: open streams answer what they read, then end
    health_servicer = health.aio.HealthServicer()
    window = (limits.stream_window, limits.stream_window_bytes)
    add_tolerant_servicer(kserve_grpc.add_GRPCInferenceServiceServicer_to_server,
                          KServeServicer(store, stopping, health_servicer, security.model_control, window), server)
    add_tolerant_servicer(pb_grpc.add_SpecServeServicer_to_server, DomainServicer(store, stopping, window), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.reflection:
        services = (
            kserve.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            pb.DESCRIPTOR.services_by_name["SpecServe"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
    credentials = security.credentials()
    try:
        port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc's "Failed to bind"
        port = 0
    if port == 0:
        raise SpecserveError(f"cannot listen on {address}: the port is in use or the address is not local")
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    server.store = store  # type: ignore[attr-defined]
    server.stopping = stopping  # type: ignore[attr-defined]
    server.security = security  # type: ignore[attr-defined]
    server.trimmer = Trimmer(memory, store.shrink_arenas)  # type: ignore[attr-defined]
    metrics.track_models_ready(lambda: sum(m.ready for m in list(store.models.values())))
    return server, port


async def watch_repository(server, interval: float) -> None:
    """Every ``interval`` seconds reload the model folders that changed on disk (off the event loop)."""
    while True:
        await asyncio.sleep(interval)
        try:
            if await asyncio.to_thread(server.store.refresh):
                await sync_health(server.health_servicer, server.store)
        except Exception:  # noqa: BLE001 - a bad scan must not stop serving; the next one retries
            log.exception("repository scan failed")


async def serve(repository: str | Path, host: str = "127.0.0.1", port: int = 8001,
                grace_seconds: float = 10.0, on_started: Callable[[int], None] | None = None,
                device: Device | None = None, poll_repository: float = 2.0,
                metrics_port: int | None = None, on_metrics: Callable[[int], None] | None = None,
                metrics_required: bool = True, security: Security | None = None,
                limits: Limits | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then stop accepting and finish what was accepted. Every
    ``poll_repository`` seconds (0: never) changed model folders are reloaded. With
    ``metrics_port`` (0: any free port) Prometheus metrics are served on ``host:metrics_port``;
    a busy port is an error when ``metrics_required``, else a warning. SIGHUP re-reads the TLS
    certificates (they are also re-read when their files change)."""
    server, bound = create_server(repository, f"{host}:{port}", device, security, limits)
    metrics_host = server.security.metrics_host(host)  # scrape them there, or through a proxy
    if metrics_port is not None:
        try:
            bound_metrics = metrics.start_metrics_server(metrics_host, metrics_port)
        except OSError as exc:
            message = f"cannot serve metrics on {metrics_host}:{metrics_port}: {exc.strerror or exc}"
            if metrics_required:
                raise SpecserveError(message) from exc
            log.warning("%s; metrics are off (choose a port with --metrics-port)", message)
        else:
            log.info("metrics on http://%s:%d/metrics", metrics_host, bound_metrics)
            if on_metrics is not None:
                on_metrics(bound_metrics)
    await server.start()
    server.trimmer.start()
    # everything loaded so far (modules, sessions, descriptors: several 100,000 objects) lives as
    # long as the server; out of the collector's sight, a full collection no longer stalls
    # requests for tens of milliseconds
    gc.collect()
    gc.freeze()
    # a batch worker whose session run ended waits for the GIL at most this long while the event
    # loop is busy (Python's default, 5 ms, showed up whole in the latency tail)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    await sync_health(server.health_servicer, server.store)
    log.info("serving %s on %s:%d", repository, host, bound)
    if on_started is not None:
        on_started(bound)
    loop = asyncio.get_running_loop()
    # the domain API's threads mostly wait for their batches: allow many, so batches can fill
    loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="specserve-request"))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stopping.set)
    if server.security.watch is not None:
        loop.add_signal_handler(signal.SIGHUP, server.security.watch.reload)
    watcher = asyncio.create_task(watch_repository(server, poll_repository)) if poll_repository > 0 else None
    await server.stopping.wait()  # set by the signal: open streams stop reading at once
    if watcher is not None:
        watcher.cancel()
    log.info("shutting down: draining for up to %.0f s", grace_seconds)
    await sync_health(server.health_servicer, server.store, stopping=True)
    # first the servicers refuse new calls themselves (UNAVAILABLE) while gRPC is still taking
    # them: calls it had received but not yet handed over would otherwise be cancelled by the stop
    # below, and their clients would see CANCELLED
    refusing = min(REFUSE_BEFORE_STOP_S, grace_seconds / 4)
    await asyncio.sleep(refusing)
    await server.stop(grace_seconds - refusing)  # new calls are refused; accepted ones run to their answer
    await asyncio.to_thread(server.store.close, grace_seconds)
    log.info("stopped")
