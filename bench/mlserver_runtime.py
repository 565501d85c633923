"""An MLServer runtime that serves one ONNX file, for ``bench/run.py``'s peer rows.

Runs inside MLServer (the peers' Python environment), copied by ``bench/run.py`` into the
temporary MLServer repository it writes. One onnxruntime session (CPU, default threads);
every input of the request is decoded by name, every output of the model is returned.
Adaptive batching (``max_batch_size`` / ``max_batch_time`` in model-settings.json) merges
requests along the first dimension before ``predict`` sees them.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError("model-settings.json: parameters.uri must name the ONNX file")
        self._session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return self.ready

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {
            i.name: NumpyCodec.decode_input(i).astype(np.float32, copy=False)
            for i in payload.inputs
        }
        results = self._session.run(self._outputs, feed)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name=name, payload=value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )
