"""gRPC health: the server's services and one ``model/<name>`` entry per model."""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2

from specserve.runtime.engine.store import ModelStore

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", "inference.GRPCInferenceService", "specserve.v1.SpecServe")
MODEL_HEALTH_PREFIX = "model/"
"""Each model's health has the service name ``model/<name>``: SERVING while it is ready."""


async def sync_health(health_servicer, store: ModelStore, stopping: bool = False) -> None:
    """The server's health (SERVING while any model is ready, NOT_SERVING while draining) and
    every model's (``model/<name>``), from the store as it is now."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    models = dict(store.models)
    overall = serving if not stopping and any(m.ready for m in models.values()) else not_serving
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, overall)
    for name, model in models.items():
        await health_servicer.set(MODEL_HEALTH_PREFIX + name, serving if model.ready and not stopping else not_serving)



