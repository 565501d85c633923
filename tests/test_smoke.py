import grpc
import numpy as np

from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import RunningServer


async def test_simple_model_adds_and_subtracts(server: RunningServer) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = await stub.ModelInfer(
            pb.ModelInferRequest(
                model_name="simple",
                inputs=[
                    pb.ModelInferRequest.InferInputTensor(name=n, datatype="INT32", shape=[1, 16])
                    for n in ("INPUT0", "INPUT1")
                ],
                raw_input_contents=[a.tobytes(), b.tobytes()],
            )
        )
    out0 = np.frombuffer(response.raw_output_contents[0], np.int32).reshape(1, 16)
    out1 = np.frombuffer(response.raw_output_contents[1], np.int32).reshape(1, 16)
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)
