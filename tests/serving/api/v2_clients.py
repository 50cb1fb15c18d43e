"""Calls a running gateway with the real Open Inference Protocol clients: tritonclient
(http and grpc) and the kserve SDK (InferenceRESTClient, InferenceGRPCClient).

Run by tests/serving/api/test_v2_clients.py in a virtual environment of its own (the
clients pin protobuf < 7; the gateway is generated for 7), so it imports nothing from
the project: ``python v2_clients.py tritonclient|kserve INPUT.json REST_URL GRPC_ADDRESS > RESULTS.json``
(one process each: both register their own copy of the protocol's messages, package
``inference``, in protobuf's default pool, and clash in one process).

INPUT.json: {"texts": [...], "token_ids": [[...20 ids]], "digits": [[28x28]], "pngs_b64": [...]}.
Output: {client: {case: {"probabilities": [[...]], "label": [...], "model_version": "1"}}}
plus {client: {"health": {...}, "errors": {...}}}, and for tritonclient {client: {"methods":
{call: {"ok": answer} or {"error": {"status", "message", "str"}}}}}: every other method of the
client (repository, statistics, config, shared memory, trace, logging, async and stream infer).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import numpy as np

def cases(data: dict) -> dict:
    texts = np.array([t.encode() for t in data["texts"]], dtype=np.object_)
    digits = np.array(data["digits"], dtype=np.uint8)
    pngs = np.array([base64.b64decode(p) for p in data["pngs_b64"]], dtype=np.object_)
    return {
        "sentiment_lstm text": ("sentiment_lstm", "text", "BYTES", texts),
        "sentiment_bilstm text": ("sentiment_bilstm", "text", "BYTES", texts),
        "sentiment_lstm token_ids": ("sentiment_lstm", "token_ids", "INT32", np.array(data["token_ids"], dtype=np.int32)),
        "digits image UINT8": ("digits", "image", "UINT8", digits),
        "digits image FP32": ("digits", "image", "FP32", digits.astype(np.float32)),
        "digits image_encoded": ("digits", "image_encoded", "BYTES", pngs),
    }


def result(probabilities, label, version) -> dict:
    label = [x.decode() if isinstance(x, bytes) else x if isinstance(x, str) else int(x)
             for x in np.asarray(label).reshape(-1).tolist()]
    return {"probabilities": np.asarray(probabilities, dtype=np.float64).tolist(), "label": label, "model_version": version}


def attempt(fn, *args, **kwargs) -> dict:
    """``fn``'s answer (protobuf messages as dicts), or its InferenceServerException as the client
    shows it: ``str(e)`` must work (it fails when the server's error body is not the protocol's)."""
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import Message
    from tritonclient.utils import InferenceServerException

    try:
        answer = fn(*args, **kwargs)
    except InferenceServerException as e:
        try:
            shown = str(e)
        except Exception as failed:  # noqa: BLE001 - what the test reports (e.g. a /v1-shaped error body)
            shown = f"str() failed: {failed!r}; message: {e.message()!r}"
        return {"error": {"status": e.status(), "message": repr(e.message()) if not isinstance(e.message(), str)
                          else e.message(), "str": shown}}
    if isinstance(answer, Message):
        answer = MessageToDict(answer, preserving_proto_field_name=True)
    return {"ok": answer}


def triton_methods(client, infer_input, stream: bool) -> dict:
    """Every method of a tritonclient InferenceServerClient (http or grpc) beyond plain infer."""
    out = {
        "get_server_metadata": attempt(client.get_server_metadata),
        "get_model_metadata": attempt(client.get_model_metadata, "digits", "stable"),
        "is_model_ready nope": attempt(client.is_model_ready, "nope"),
        "get_model_config": attempt(client.get_model_config, "digits"),
        "get_model_config nope": attempt(client.get_model_config, "nope"),
        "get_model_repository_index": attempt(client.get_model_repository_index),
        "load_model": attempt(client.load_model, "digits"),
        "load_model nope": attempt(client.load_model, "nope"),
        "load_model config": attempt(client.load_model, "digits", config="{}"),
        "unload_model": attempt(client.unload_model, "digits"),
        "get_inference_statistics": attempt(client.get_inference_statistics, "digits"),
        "get_inference_statistics all": attempt(client.get_inference_statistics),
        "get_inference_statistics nope": attempt(client.get_inference_statistics, "nope"),
        "get_trace_settings": attempt(client.get_trace_settings),
        "update_trace_settings": attempt(client.update_trace_settings, settings={"trace_level": ["TIMESTAMPS"]}),
        "get_log_settings": attempt(client.get_log_settings),
        "update_log_settings": attempt(client.update_log_settings, {"log_verbose_level": 1}),
        "get_system_shared_memory_status": attempt(client.get_system_shared_memory_status),
        "register_system_shared_memory": attempt(client.register_system_shared_memory, "r", "/r", 16),
        "unregister_system_shared_memory": attempt(client.unregister_system_shared_memory),
        "get_cuda_shared_memory_status": attempt(client.get_cuda_shared_memory_status),
        "register_cuda_shared_memory": attempt(client.register_cuda_shared_memory, "r", b"aGFuZGxl", 0, 16),
        "unregister_cuda_shared_memory": attempt(client.unregister_cuda_shared_memory),
        "infer timeout": attempt(client.infer, "sentiment_lstm", [infer_input], timeout=1),
    }
    import queue

    labels = lambda r: [x.decode() for x in r.as_numpy("label").reshape(-1).tolist()]  # noqa: E731
    answers = queue.Queue()
    if stream:  # gRPC: async_infer calls back
        client.async_infer("sentiment_lstm", [infer_input], lambda result, error: answers.put(
            str(error) if error else labels(result)))
        out["async_infer"] = {"ok": answers.get(timeout=60)}
    else:  # http: a handle to wait on
        out["async_infer"] = attempt(lambda: labels(client.async_infer("sentiment_lstm", [infer_input]).get_result()))
    if stream:  # gRPC only: ModelStreamInfer, one answer or error per request, in order
        client.start_stream(callback=lambda result, error: answers.put(str(error) if error else labels(result)))
        try:
            for model in ("sentiment_lstm", "nope", "sentiment_lstm"):
                client.async_stream_infer(model, [infer_input])
            out["stream"] = [answers.get(timeout=60) for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["stream"] = f"failed: {e!r}"
        client.stop_stream()
    return out


def triton_http(rest_url: str, data: dict) -> dict:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(rest_url.removeprefix("http://"))
    out = {"health": {"live": client.is_server_live(), "ready": client.is_server_ready(),
                      "model_ready": client.is_model_ready("digits"),
                      "metadata_inputs": [i["name"] for i in client.get_model_metadata("sentiment_lstm")["inputs"]]}}
    for case, (model, name, datatype, array) in cases(data).items():
        binary = case != "sentiment_bilstm text"  # one case in JSON (binary_data=False), the rest binary (the default)
        x = http.InferInput(name, list(array.shape), datatype)
        x.set_data_from_numpy(array, binary_data=binary)
        outputs = [http.InferRequestedOutput("probabilities", binary_data=binary), http.InferRequestedOutput("label", binary_data=binary)]
        r = client.infer(model, [x], outputs=outputs if case != "digits image FP32" else None)
        out[case] = result(r.as_numpy("probabilities"), r.as_numpy("label"), r.get_response()["model_version"])
    x = http.InferInput("text", [1], "BYTES")
    x.set_data_from_numpy(np.array([b"fine"], dtype=np.object_))
    errors = {}
    for label, model in (("unknown model", "nope"), ("version label", "sentiment_lstm")):
        try:
            client.infer(model, [x], model_version="beta" if label == "version label" else "")
        except InferenceServerException as e:
            errors[label] = {"status": e.status(), "message": e.message()}
    out["errors"] = errors
    out["methods"] = triton_methods(client, x, stream=False)
    return out


def triton_grpc(grpc_address: str, data: dict) -> dict:
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    client = tgrpc.InferenceServerClient(grpc_address)
    out = {"health": {"live": client.is_server_live(), "ready": client.is_server_ready(),
                      "model_ready": client.is_model_ready("digits"),
                      "metadata_inputs": [i.name for i in client.get_model_metadata("sentiment_lstm").inputs]}}
    for case, (model, name, datatype, array) in cases(data).items():
        x = tgrpc.InferInput(name, list(array.shape), datatype)
        x.set_data_from_numpy(array)
        r = client.infer(model, [x], model_version="stable" if case == "digits image UINT8" else "")
        out[case] = result(r.as_numpy("probabilities"), r.as_numpy("label"), r.get_response().model_version)
    x = tgrpc.InferInput("text", [1], "BYTES")
    x.set_data_from_numpy(np.array([b"x" * 20_001], dtype=np.object_))
    try:
        client.infer("sentiment_lstm", [x])
    except InferenceServerException as e:
        out["errors"] = {"too long": {"status": e.status(), "message": e.message()}}
    x = tgrpc.InferInput("text", [1], "BYTES")
    x.set_data_from_numpy(np.array([b"fine"], dtype=np.object_))
    out["methods"] = triton_methods(client, x, stream=True)
    return out


async def kserve_clients(rest_url: str, grpc_address: str, data: dict) -> dict:
    from kserve import InferInput, InferRequest, InferenceGRPCClient, InferenceRESTClient, RESTConfig

    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    grpc_client = InferenceGRPCClient(grpc_address, timeout=60)
    out = {"rest": {}, "grpc": {}}
    try:
        out["rest"]["health"] = {"live": await rest.is_server_live(rest_url), "ready": await rest.is_server_ready(rest_url),
                                 "model_ready": await rest.is_model_ready(rest_url, "digits")}
        out["grpc"]["health"] = {"live": await grpc_client.is_server_live(), "ready": await grpc_client.is_server_ready(),
                                 "model_ready": await grpc_client.is_model_ready("digits")}
        for case, (model, name, datatype, array) in cases(data).items():
            for proto in ("rest", "grpc"):
                x = InferInput(name, list(array.shape), datatype)
                # REST: texts as JSON, the rest binary (PNG bytes cannot be JSON strings)
                x.set_data_from_numpy(array, binary_data=proto == "grpc" or name != "text")
                request = InferRequest(model_name=model, infer_inputs=[x], request_id=f"kserve-{proto}")
                if proto == "rest":
                    r = await rest.infer(rest_url, request, model_name=model)
                else:
                    r = await grpc_client.infer(request)
                by_name = {o.name: o.as_numpy() for o in r.outputs}
                out[proto][case] = result(by_name["probabilities"], by_name["label"], r.model_version)
                out[proto][case]["id"] = r.id
    finally:
        await rest.close()
        await grpc_client.close()
    return out


def main() -> int:
    which, data = sys.argv[1], json.loads(open(sys.argv[2]).read())
    rest_url, grpc_address = sys.argv[3], sys.argv[4]
    if which == "tritonclient":
        out = {"tritonclient.http": triton_http(rest_url, data), "tritonclient.grpc": triton_grpc(grpc_address, data)}
    else:
        k = asyncio.run(kserve_clients(rest_url, grpc_address, data))
        out = {"kserve.rest": k["rest"], "kserve.grpc": k["grpc"]}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
