"""A small synchronous client for rtserve's KServe v2 API (binary tensors by default)."""
from __future__ import annotations

import os

import httpx
import numpy as np
import orjson

from .server.protocols.kserve_v2 import encode_tensors
from .tensors import deserialize_bytes_tensor, element_count, v2_to_numpy

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class Client:
    """``Client(url).infer("digits", {"image": x})`` -> ``{"logits": ..., "label": ...}``."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {}
        key = api_key if api_key is not None else os.environ.get("RTSERVE_API_KEY")
        if key:
            headers["authorization"] = f"Bearer {key}"
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code != 200:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            raise ClientError(r.status_code, msg)
        return r

    def live(self) -> bool:
        return self.http.get("/v2/health/live").status_code == 200

    def ready(self) -> bool:
        return self.http.get("/v2/health/ready").status_code == 200

    def server_metadata(self) -> dict:
        return self._check(self.http.get("/v2")).json()

    def metadata(self, model: str, version: str | None = None) -> dict:
        return self._check(self.http.get(self._path(model, version))).json()

    def index(self) -> list[dict]:
        return self._check(self.http.post("/v2/repository/index", content=b"{}")).json()

    def load(self, model: str) -> None:
        self._check(self.http.post(f"/v2/repository/models/{model}/load", content=b"{}"))

    def unload(self, model: str) -> None:
        self._check(self.http.post(f"/v2/repository/models/{model}/unload", content=b"{}"))

    @staticmethod
    def _path(model: str, version: str | None) -> str:
        return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str] | None = None,
              version: str | None = None, binary: bool = True, priority: int | None = None,
              timeout_ms: float | None = None) -> dict[str, np.ndarray]:
        items, blobs = encode_tensors([(name, np.asarray(arr), binary) for name, arr in inputs.items()])
        params: dict = {"binary_data_output": binary}
        if priority is not None:
            params["priority"] = priority
        if timeout_ms is not None:
            params["timeout"] = int(timeout_ms * 1000)
        doc: dict = {"inputs": items, "parameters": params}
        if outputs:
            doc["outputs"] = [{"name": n, "parameters": {"binary_data": binary}} for n in outputs]
        header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"content-type": "application/octet-stream" if blobs else "application/json"}
        if blobs:
            headers["inference-header-content-length"] = str(len(header))
        r = self._check(self.http.post(self._path(model, version) + "/infer", content=header + b"".join(blobs),
                                       headers=headers))
        return decode_response(r.content, r.headers.get("inference-header-content-length"))


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    n = int(header_length) if header_length is not None else len(body)
    doc = orjson.loads(body[:n])
    out, offset = {}, n
    for o in doc["outputs"]:
        dtype = v2_to_numpy(o["datatype"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            chunk = body[offset:offset + size]
            offset += size
            arr = (deserialize_bytes_tensor(chunk, element_count(o["shape"])) if o["datatype"] == "BYTES"
                   else np.frombuffer(chunk, dtype=dtype))
        elif o["datatype"] == "BYTES":
            arr = np.array([s.encode() for s in o["data"]], dtype=object)
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out
