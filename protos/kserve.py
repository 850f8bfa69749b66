"""The KServe v2 / Triton gRPC protocol, from Triton's own compiled protos.

specserve serves ``inference.GRPCInferenceService`` with the very modules tritonclient ships
(``grpc_service.proto`` and ``model_config.proto`` in the descriptor pool), so tritonclient, Triton's
tools and specserve load in one process, and ``config.pbtxt`` is parsed by Triton's own schema
(:mod:`specserve.runtime.engine.model_config`). The project's own API, ``specserve.v1``, is
``specserve.proto`` in this folder.
"""

from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

__all__ = ["model_config_pb2", "service_pb2", "service_pb2_grpc"]
