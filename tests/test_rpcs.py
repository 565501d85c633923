"""The RPC table (what each method is, for the interceptors) names every method served."""

from __future__ import annotations

import pytest

from sluice.transport.rpcs import RPCS, rpc
from sluice_api.inference import grpc_service_pb2
from sluice_api.sluice.v1 import generation_service_pb2, model_service_pb2

SERVICES = [
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"],
]


def test_every_method_has_a_row_and_every_row_a_method() -> None:
    served = {f"/{s.full_name}/{m.name}" for s in SERVICES for m in s.methods}
    assert set(RPCS) == served


def test_health_and_reflection_are_operational_and_untraced() -> None:
    for method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        kind = rpc(method)
        assert kind.operational and not kind.traced and not kind.admitted


@pytest.mark.parametrize(
    ("method", "admin"),
    [
        ("/sluice.v1.ModelService/PromoteModel", True),
        ("/inference.GRPCInferenceService/RepositoryModelUnload", True),
        ("/sluice.v1.ModelService/GetModelHistory", False),
        ("/inference.GRPCInferenceService/ModelInfer", False),
    ],
)
def test_admin_methods_are_the_ones_that_change_what_is_served(method: str, admin: bool) -> None:
    assert rpc(method).admin is admin
