#!/usr/bin/env python3
"""Serve one ONNX file with PyTriton, for ``bench/run.py``'s peer rows.

Runs in the peers' Python environment (nvidia-pytriton, onnxruntime), not Sluice's. PyTriton
starts Triton's own server binary (C++ gRPC front end, Python backend) and hands each batch
to the function below, which runs one onnxruntime session (CPU, default threads). The
tensors (names, FP32, shapes without the batch dimension) come from the ONNX file, so any
FP32 model with a dynamic batch dimension can be served. Dynamic batching: up to
``--max-batch-size`` rows, ``--max-queue-delay-us`` (default 100, PyTriton's example
setting). ModelStatistics is left unrestricted (perf_analyzer calls it). Logs
``gRPC listening on 127.0.0.1:PORT`` once bound, like Sluice; SIGTERM stops it.

    python bench/pytriton_server.py --model-path m.onnx --model-name mlp \
        --grpc-port 8101 --http-port 8100
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=100)
    args = parser.parse_args()

    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    # A background process may start with SIGINT ignored; make SIGTERM and SIGINT end
    # serve() the way Ctrl-C does, so that Triton.stop() takes its server down with it.
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )

    session = ort.InferenceSession(args.model_path, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        feed = {name: inputs[name].astype(np.float32, copy=False) for name in input_names}
        return dict(zip(output_names, session.run(output_names, feed), strict=True))

    def tensors(items: Any) -> list[Any]:
        return [Tensor(name=t.name, dtype=np.float32, shape=tuple(t.shape[1:])) for t in items]

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
    )
    # PyTriton puts some protocol groups behind an access token by default; statistics
    # must stay open for perf_analyzer.
    security = TritonSecurityConfig(
        restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"]
    )
    workspace = os.path.join(tempfile.gettempdir(), f"bench-pytriton-{os.getpid()}")
    with Triton(config=config, workspace=workspace, security_config=security) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=tensors(session.get_inputs()),
            outputs=tensors(session.get_outputs()),
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=False,
        )
        print(f"gRPC listening on 127.0.0.1:{args.grpc_port}", flush=True)
        triton.serve()
    shutil.rmtree(workspace, ignore_errors=True)


if __name__ == "__main__":
    main()
