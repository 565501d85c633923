#!/usr/bin/env python3
"""Request generator for ``perf_analyzer --service-kind=dynamic_grpc``.

Writes serialized ``inference.ModelInferRequest`` messages to stdout in perf_analyzer's
framing (a 4-byte native-endian length, then the bytes). Each request carries one row:
every ``--input NAME:D1xD2...`` as FP32 of shape [1, D1, D2, ...] in
``raw_input_contents`` (seeded random values), and asks for every ``--output NAME``.
``bench/run.py`` uses it for servers that lack the ModelConfig / ServerMetadata RPCs that
perf_analyzer's triton mode needs (MLServer).

    python bench/infer_requests.py --model mlp --input input:256 --output output
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from sluice_api.inference import grpc_service_pb2 as pb


def parse_tensor(spec: str) -> tuple[str, list[int]]:
    """``NAME:D1xD2`` -> (NAME, [D1, D2])."""
    name, sep, dims = spec.rpartition(":")
    if not sep or not name:
        raise ValueError(f"expected NAME:D1xD2..., not {spec!r}")
    return name, [int(d) for d in dims.split("x")]


def request(
    model: str, inputs: list[tuple[str, list[int]]], outputs: list[str], seed: int
) -> bytes:
    rng = np.random.default_rng(seed)
    req = pb.ModelInferRequest(model_name=model)
    for name, dims in inputs:
        req.inputs.add(name=name, datatype="FP32", shape=[1, *dims])
        req.raw_input_contents.append(rng.random((1, *dims), dtype=np.float32).tobytes())
    for name in outputs:
        req.outputs.add(name=name)
    return req.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", action="append", required=True, metavar="NAME:D1xD2")
    parser.add_argument("--output", action="append", default=[], metavar="NAME")
    parser.add_argument("--count", type=int, default=1, help="messages (ModelInfer is unary: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    inputs = [parse_tensor(s) for s in args.input]
    out = sys.stdout.buffer
    for i in range(args.count):
        data = request(args.model, inputs, args.output, args.seed + i)
        out.write(len(data).to_bytes(4, byteorder=sys.byteorder))
        out.write(data)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
