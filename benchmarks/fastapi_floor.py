"""The floor to beat: a plain FastAPI + ONNX Runtime server, written as a user would write one:
one request, one ``session.run``, a sync endpoint (FastAPI runs it in its thread pool), pydantic
parsing of the same KServe v2 JSON body. Used only by benchmarks/serving.py.

    python benchmarks/fastapi_floor.py MODEL.onnx PORT
"""
from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

DTYPES = {"FP32": np.float32, "INT64": np.int64}


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferRequest(BaseModel):
    inputs: list[Tensor]


def build(model_path: str) -> FastAPI:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.get("/v2/health/ready")
    def ready():
        return {}

    @app.post("/v2/models/{name}/infer")
    def infer(name: str, req: InferRequest):
        feeds = {t.name: np.asarray(t.data, dtype=DTYPES[t.datatype]).reshape(t.shape) for t in req.inputs}
        outs = session.run(None, feeds)
        return {"model_name": name, "outputs": [
            {"name": o.name, "datatype": "FP32", "shape": list(v.shape), "data": v.reshape(-1).tolist()}
            for o, v in zip(session.get_outputs(), outs)]}

    return app


if __name__ == "__main__":
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                access_log=False)
