#!/usr/bin/env python3
"""The transport ceiling: a grpc.aio ``inference.GRPCInferenceService`` that does no math.

It implements just enough of the Open Inference Protocol v2 (Triton flavour) for
``perf_analyzer -i grpc``:

* ``ServerMetadata``: no extensions (so perf_analyzer never asks for ModelStatistics);
* ``ModelMetadata`` / ``ModelConfig``: one model, by default with the benchmark MLP's
  shapes (FP32 ``input`` [-1, 256] -> FP32 ``output`` [-1, 16], ``max_batch_size`` 64);
  ``--input NAME:D1xD2`` / ``--output NAME:D1xD2`` (repeatable) describe other FP32
  models, such as the two-input convolution of ``bench/conv_model.py``;
* ``ModelInfer``: answers a zero tensor of the right size for every output (batch rows
  taken from the first input's shape) without reading the input bytes; unknown parameters
  are ignored;
* ``ServerLive`` / ``ServerReady`` / ``ModelReady``: true (``bench/run.py`` polls them).

It uses Sluice's generated stubs (``sluice_api.inference``) and the same grpc.aio server
options as Sluice, but no interceptors, batcher, executor or thread hop, so whatever
throughput it reaches is the most a Python grpc.aio server can do on this machine with
the same client. It runs on the event loop Sluice runs on by default (``--event-loop
auto``: uvloop where installed, as Sluice's ``event_loop`` setting; ``asyncio`` keeps the
standard loop, as every run before 2026-12-07 did), and logs which (``event loop:
uvloop``). Like Sluice, it logs ``gRPC listening on HOST:PORT`` (at INFO, on stderr) once
the port is bound; ``--port 0`` picks a free port.

    python bench/null_server.py --port 0 [--event-loop auto|uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from typing import Any, get_args

import grpc

from sluice.eventloop import EventLoopChoice, loop_factory, loop_name
from sluice_api.inference import grpc_service_pb2 as pb
from sluice_api.inference import grpc_service_pb2_grpc as pb_grpc
from sluice_api.inference import model_config_pb2 as mc

log = logging.getLogger("null_server")

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # Sluice's default max_message_bytes


class NullInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        *,
        model: str,
        inputs: list[tuple[str, list[int]]],
        outputs: list[tuple[str, list[int]]],
        max_batch_size: int,
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self._zeros: dict[tuple[int, int], bytes] = {}

    # -- health ---------------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.model)

    # -- metadata -------------------------------------------------------------------------

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="null", version="0", extensions=[])

    async def _check_model(self, name: str, context: Any) -> None:
        if name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        await self._check_model(request.name, context)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[meta(name=n, datatype="FP32", shape=[-1, *dims]) for n, dims in self.inputs],
            outputs=[meta(name=n, datatype="FP32", shape=[-1, *dims]) for n, dims in self.outputs],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        await self._check_model(request.name, context)
        config = mc.ModelConfig(
            name=self.model,
            platform="onnxruntime_onnx",
            backend="onnxruntime",
            max_batch_size=self.max_batch_size,
            input=[
                mc.ModelInput(name=n, data_type=mc.TYPE_FP32, dims=dims) for n, dims in self.inputs
            ],
            output=[
                mc.ModelOutput(name=n, data_type=mc.TYPE_FP32, dims=dims)
                for n, dims in self.outputs
            ],
        )
        return pb.ModelConfigResponse(config=config)

    # -- inference ------------------------------------------------------------------------

    def _zero_output(self, rows: int, size: int) -> bytes:
        data = self._zeros.get((rows, size))
        if data is None:
            data = self._zeros[rows, size] = bytes(rows * size * 4)
        return data

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        if request.model_name != self.model:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{request.model_name}'")
        rows = 1
        if request.inputs and len(request.inputs[0].shape) > 1:
            rows = max(1, int(request.inputs[0].shape[0]))
        response = pb.ModelInferResponse(model_name=self.model, model_version="1", id=request.id)
        for name, dims in self.outputs:
            response.outputs.add(name=name, datatype="FP32", shape=[rows, *dims])
            response.raw_output_contents.append(self._zero_output(rows, math.prod(dims)))
        return response


async def serve(args: argparse.Namespace) -> int:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    servicer = NullInferenceServicer(
        model=args.model,
        inputs=args.input or [(args.input_name, [args.input_dim])],
        outputs=args.output or [(args.output_name, [args.output_dim])],
        max_batch_size=args.max_batch_size,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        log.error("could not bind %s:%d", args.host, args.port)
        return 1
    await server.start()
    log.info("gRPC listening on %s:%d", args.host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    log.info("stopped")
    return 0


def tensor_spec(spec: str) -> tuple[str, list[int]]:
    """``NAME:D1xD2`` -> (NAME, [D1, D2])."""
    name, sep, dims = spec.rpartition(":")
    try:
        shape = [int(d) for d in dims.split("x")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME:D1xD2 with positive dims, not {spec!r}")
    return name, shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--input-name", default="input")
    parser.add_argument("--input-dim", type=int, default=256)
    parser.add_argument("--output-name", default="output")
    parser.add_argument("--output-dim", type=int, default=16)
    parser.add_argument(
        "--input",
        action="append",
        type=tensor_spec,
        metavar="NAME:D1xD2",
        help="an FP32 input and its dimensions after the batch one (repeatable; replaces "
        "--input-name / --input-dim)",
    )
    parser.add_argument(
        "--output",
        action="append",
        type=tensor_spec,
        metavar="NAME:D1xD2",
        help="an FP32 output, as --input",
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--event-loop",
        choices=get_args(EventLoopChoice),
        default="auto",
        help="the loop to serve on, as Sluice's event_loop setting (default: auto, uvloop "
        "where installed)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        log.info("event loop: %s", loop_name(runner.get_loop()))
        return runner.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
