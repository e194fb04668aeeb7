"""The Open Inference Protocol (KServe v2 / Triton) against a real `advserve serve` process, through
the stock `tritonclient` (HTTP and gRPC) and raw requests: health, metadata, inference of a GRPO, a
GAE and a loss request over both transports, binary and JSON, equal to the native API's answers;
malformed requests get the protocol's error; auth, body limits, metrics; the proto's field numbers
are the stock client's."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.grpc import service_pb2_grpc as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

import advserve
from advserve import errors as domain_errors
from advserve._oip_pb import grpc_service_pb2 as oip_pb
from advserve.transports.http_door import oip_error_response
from conftest import RunningServer

TRANSPORTS = ["http-binary", "http-json", "grpc"]
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], bool)


@pytest.fixture(scope="module")
def oip_server():
    server = RunningServer()
    yield server
    server.stop()
    assert server.problems() == [], server.output()[-4000:]


@pytest.fixture(scope="module")
def http(oip_server):
    client = httpclient.InferenceServerClient(oip_server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(oip_server):
    client = grpcclient.InferenceServerClient(oip_server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def native(oip_server):
    with httpx.Client(base_url=oip_server.url, timeout=60) as client:
        yield client


def infer(transport: str, clients, model: str, arrays: dict, parameters: dict | None = None,
          outputs: list[str] | None = None, headers: dict | None = None, **kwargs):
    """tritonclient's infer over `transport`: every input binary (or JSON), the outputs likewise."""
    http, grpc_ = clients
    module = grpcclient if transport == "grpc" else httpclient
    binary = transport == "http-binary"
    inputs = []
    for name, array in arrays.items():
        item = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        if module is httpclient:
            item.set_data_from_numpy(array, binary_data=binary)
        else:
            item.set_data_from_numpy(array)
        inputs.append(item)
    requested = None
    if outputs is not None:
        requested = [module.InferRequestedOutput(name, binary_data=binary) if module is httpclient
                     else module.InferRequestedOutput(name) for name in outputs]
    elif transport == "http-json":  # without outputs listed tritonclient asks for binary ones
        names = {"losses": ["grad_logprobs", "grad_values", "loss"]}.get(model, ["advantages", "returns"])
        requested = [httpclient.InferRequestedOutput(name, binary_data=False) for name in names]
    client = grpc_ if transport == "grpc" else http
    return client.infer(model, inputs, outputs=requested, parameters=parameters, headers=headers, **kwargs)


def response_parameters(result) -> dict:
    response = result.get_response()
    if isinstance(response, dict):
        return response.get("parameters", {})
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in response.parameters.items()}


def as_list(array: np.ndarray):
    return array.tolist() if array.dtype != object else [v.decode() for v in array]


# --- proto, health, metadata ------------------------------------------------------------------------


def test_proto_field_numbers_and_types_are_the_stock_clients():
    """Every message and field we serve has the number, type and label of tritonclient's proto
    (Triton's grpc_service.proto, a superset of the KServe specification's); the two stub sets live
    in one process (ours use a private descriptor pool)."""
    ours = oip_pb.DESCRIPTOR
    checked = 0

    def compare(mine, theirs):
        nonlocal checked
        for f in mine.fields:
            other = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (other.number, other.type, other.is_repeated), f.full_name
            if f.message_type is not None:
                assert f.message_type.name == other.message_type.name, f.full_name
            checked += 1
        for nested in mine.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name])

    for name, message in ours.message_types_by_name.items():
        compare(message, triton_pb.DESCRIPTOR.message_types_by_name[name])
    service, stock = ours.services_by_name["GRPCInferenceService"], triton_pb.DESCRIPTOR.services_by_name[
        "GRPCInferenceService"]
    assert service.full_name == stock.full_name == "inference.GRPCInferenceService"
    for method in service.methods:
        other = stock.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == \
            (other.input_type.full_name, other.output_type.full_name)
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        *(f"{kind}SharedMemory{verb}" for kind in ("System", "Cuda") for verb in ("Status", "Register", "Unregister"))}
    assert checked > 50
    assert ours.pool is not triton_pb.DESCRIPTOR.pool


def test_health_and_server_metadata(http, grpc_client, native):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    for metadata in (http.get_server_metadata(), grpc_client.get_server_metadata(as_json=True)):
        assert metadata["name"] == "advserve" and metadata["version"] == advserve.__version__
        assert "binary_tensor_data" in metadata["extensions"]
    assert native.get("/v2/health/live").json() == {"live": True}
    assert native.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_lists_inputs_and_outputs(http, grpc_client):
    catalog = advserve.catalog()
    names = [entry["name"] for entry in catalog["estimators"]]
    for name in names + ["losses"]:
        assert http.is_model_ready(name) and grpc_client.is_model_ready(name)
        assert http.is_model_ready(name, "1")
    gae = http.get_model_metadata("gae")
    by_grpc = grpc_client.get_model_metadata("gae")
    assert (by_grpc.name, list(by_grpc.versions), by_grpc.platform) == ("gae", ["1"], "advserve")
    assert [(t.name, t.datatype, list(t.shape)) for t in by_grpc.inputs] == \
        [(t["name"], t["datatype"], t["shape"]) for t in gae["inputs"]]
    assert gae["versions"] == ["1"] and gae["platform"] == "advserve"
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in gae["inputs"]}
    assert inputs["rewards"] == ("FP32", [-1]) and inputs["values"] == ("FP32", [-1, -1])
    assert inputs["response_mask"] == ("BOOL", [-1, -1]) and inputs["cu_seqlens"] == ("INT64", [-1])
    assert "group_ids" not in inputs
    assert {t["name"]: t["shape"] for t in gae["outputs"]} == {"advantages": [-1, -1], "returns": [-1, -1]}
    grpo = {t["name"]: t["datatype"] for t in http.get_model_metadata("grpo")["inputs"]}
    assert grpo["group_ids"] == "INT64"
    losses = http.get_model_metadata("losses")
    assert {t["name"] for t in losses["outputs"]} == {"grad_logprobs", "grad_values", "grad_entropy", "grad_token_losses",
                                                      "kl_values", "loss"}
    assert {t["name"] for t in losses["inputs"]} >= {"logprobs", "old_logprobs", "advantages", "values", "entropy"}


def test_unknown_model_and_version(http, grpc_client, native):
    assert not http.is_model_ready("nope")
    response = native.get("/v2/models/nope")
    assert response.status_code == 404 and "unknown model 'nope'" in response.json()["error"]
    response = native.get("/v2/models/grpo/versions/2/ready")
    assert response.status_code == 404 and "version" in response.json()["error"]
    with pytest.raises(InferenceServerException) as err:
        grpc_client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "model_name: unknown model" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        grpc_client.is_model_ready("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    response = native.get("/v2/models/grpo/config")  # Triton-only endpoints: the protocol's 404
    assert response.status_code == 404 and "does not serve" in response.json()["error"]


# --- inference, equal to the native API ---------------------------------------------------------------


def grpo_arrays(ids_as_strings: bool = False) -> dict:
    ids = np.array([b"p1", b"p2", b"p1", b"p1", b"p2"], dtype=object) if ids_as_strings \
        else np.array([3, 9, 3, 3, 9], np.int64)
    return {"rewards": np.array([1, 0, 1, 0, 1], np.float32), "response_mask": MASK, "group_ids": ids}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("ids_as_strings", [False, True], ids=["int-ids", "string-ids"])
def test_grpo_equals_the_native_api(http, grpc_client, native, transport, ids_as_strings):
    arrays = grpo_arrays(ids_as_strings)
    parameters = {"preset": "verl", "std_eps": 1e-4}
    result = infer(transport, (http, grpc_client), "grpo", arrays, parameters)
    body = {"estimator": "grpo", "preset": "verl", "params": {"std_eps": 1e-4},
            "tensors": {name: as_list(a) for name, a in arrays.items()}}
    expected = native.post("/v1/advantages", json=body).json()
    for name in ("advantages", "returns"):
        out = result.as_numpy(name)
        assert out.dtype == np.float32 and out.shape == MASK.shape
        np.testing.assert_array_equal(out, np.asarray(expected["tensors"][name], np.float32))
    params = response_parameters(result)
    assert params["preset"] == "verl" and params["std_eps"] == pytest.approx(1e-4) and params["std_ddof"] == 1
    output = result.get_output("advantages")
    if transport == "http-json":
        assert "data" in output and "parameters" not in output
    elif transport == "http-binary":
        assert output["parameters"]["binary_data_size"] == MASK.size * 4


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gae_with_float_parameters_equals_the_native_api(http, grpc_client, native, transport):
    rng = np.random.default_rng(0)
    arrays = {"rewards": rng.normal(size=5), "response_mask": MASK, "values": rng.normal(size=MASK.shape)}
    parameters = {"gamma": 0.9, "lam": 0.8, "dtype": "float64"}
    result = infer(transport, (http, grpc_client), "gae", arrays, parameters)
    body = {"estimator": "gae", "params": {"gamma": 0.9, "lam": 0.8}, "dtype": "float64",
            "tensors": {name: a.tolist() for name, a in arrays.items()}}
    expected = native.post("/v1/advantages", json=body).json()["tensors"]
    local = advserve.compute_advantages("gae", params={"gamma": 0.9, "lam": 0.8}, dtype="float64", **arrays)
    for name in ("advantages", "returns"):
        out = result.as_numpy(name)
        assert out.dtype == np.float64
        np.testing.assert_array_equal(out, expected[name])
        np.testing.assert_array_equal(out, getattr(local, name))


def loss_arrays(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    shape = MASK.shape
    lp = np.log(rng.uniform(0.1, 0.9, size=shape)).astype(np.float32)
    return {"logprobs": lp, "old_logprobs": (lp + rng.normal(scale=0.3, size=shape)).astype(np.float32),
            "advantages": rng.normal(size=shape).astype(np.float32), "response_mask": MASK,
            "ref_logprobs": (lp + rng.normal(scale=0.1, size=shape)).astype(np.float32),
            "values": rng.normal(size=shape).astype(np.float32),
            "old_values": rng.normal(size=shape).astype(np.float32),
            "returns": rng.normal(size=shape).astype(np.float32)}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_losses_equal_the_native_api(http, grpc_client, native, transport):
    arrays = loss_arrays()
    parameters = {"preset": "verl", "policy_loss.clip_high": 0.28, "policy_loss.dual_clip": "null",
                  "kl_loss.coef": 0.05, "kl_loss.estimator": "k3", "value_loss": True, "value_loss.coef": 0.5}
    result = infer(transport, (http, grpc_client), "losses", arrays, parameters)
    body = {"preset": "verl", "policy_loss": {"clip_high": 0.28, "dual_clip": None},
            "kl_loss": {"coef": 0.05, "estimator": "k3"}, "value_loss": {"coef": 0.5},
            "tensors": {name: a.tolist() for name, a in arrays.items()}}
    expected = native.post("/v1/losses", json=body).json()
    for name in ("grad_logprobs", "grad_values"):
        np.testing.assert_array_equal(result.as_numpy(name), np.asarray(expected["tensors"][name], np.float32))
    assert result.as_numpy("grad_entropy") is None  # entropy_bonus is off: not an output
    assert result.as_numpy("loss").tolist() == [expected["loss"]]
    params = response_parameters(result)
    assert params["loss"] == expected["loss"]
    for term, value in expected["components"].items():
        assert params.get(f"components.{term}") == value
    for metric, value in expected["metrics"].items():
        assert params[f"metrics.{metric}"] == pytest.approx(value, rel=1e-12)
    assert params["policy_loss.clip_high"] == pytest.approx(0.28) and "policy_loss.dual_clip" not in params
    assert params["kl_loss.estimator"] == "k3"


def test_losses_terms_switch_on_and_off(http, grpc_client):
    arrays = {name: a for name, a in loss_arrays().items() if name in ("logprobs", "ref_logprobs", "response_mask")}
    arrays["entropy"] = np.full(MASK.shape, 0.5, np.float32)
    parameters = {"policy_loss": False, "kl_loss": True, "entropy_bonus.coef": 0.01}
    for client_kind in ("http-binary", "grpc"):
        result = infer(client_kind, (http, grpc_client), "losses", arrays, parameters)
        local = advserve.compute_losses(policy_loss=False, kl_loss={}, entropy_bonus={"coef": 0.01}, **arrays)
        np.testing.assert_array_equal(result.as_numpy("grad_logprobs"), local.grad_logprobs)
        np.testing.assert_array_equal(result.as_numpy("grad_entropy"), local.grad_entropy)
        assert result.as_numpy("loss")[0] == local.loss


def test_outputs_subset_and_mixed_binary_json(http, grpc_client):
    arrays = grpo_arrays()
    inputs = []
    for name, array in arrays.items():
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    outputs = [httpclient.InferRequestedOutput("returns", binary_data=False),
               httpclient.InferRequestedOutput("advantages", binary_data=True)]
    result = http.infer("grpo", inputs, outputs=outputs)
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["returns", "advantages"]
    assert "data" in response["outputs"][0] and response["outputs"][1]["parameters"]["binary_data_size"] == 5 * 4 * 4
    local = advserve.compute_advantages("grpo", **arrays)
    np.testing.assert_array_equal(result.as_numpy("returns"), local.returns)  # the JSON output
    np.testing.assert_array_equal(result.as_numpy("advantages"), local.advantages)  # the binary one
    only = infer("grpc", (http, grpc_client), "grpo", arrays, outputs=["returns"])
    assert only.as_numpy("advantages") is None and only.as_numpy("returns").shape == MASK.shape


def test_packed_layout_over_grpc(http, grpc_client):
    lengths = MASK.sum(1)
    arrays = {"rewards": np.array([1, 0, 1, 0, 1], np.float32), "group_ids": np.array([3, 9, 3, 3, 9], np.int64),
              "cu_seqlens": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    result = infer("grpc", (http, grpc_client), "grpo", arrays, {"layout": "packed"})
    padded = advserve.compute_advantages("grpo", rewards=arrays["rewards"], response_mask=MASK,
                                         group_ids=arrays["group_ids"])
    np.testing.assert_array_equal(result.as_numpy("advantages"), padded.advantages[MASK])


def test_parameters_as_int_double_or_json_text_over_grpc(http, grpc_client):
    rng = np.random.default_rng(3)
    arrays = {"rewards": rng.normal(size=5).astype(np.float32), "response_mask": MASK,
              "values": rng.normal(size=MASK.shape).astype(np.float32)}
    reference = infer("grpc", (http, grpc_client), "gae", arrays, {"gamma": 1.0, "lam": 0.5}).as_numpy("advantages")
    for parameters in ({"gamma": 1, "lam": 0.5}, {"gamma": "1.0", "lam": "0.5"}):
        np.testing.assert_array_equal(infer("grpc", (http, grpc_client), "gae", arrays, parameters)
                                      .as_numpy("advantages"), reference)


def test_gzip_request_and_request_id(http, grpc_client):
    arrays = grpo_arrays()
    inputs = []
    for name, array in arrays.items():
        item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    plain = http.infer("grpo", inputs, request_id="r-1")
    zipped = http.infer("grpo", inputs, request_id="r-2", request_compression_algorithm="gzip")
    np.testing.assert_array_equal(plain.as_numpy("advantages"), zipped.as_numpy("advantages"))
    assert zipped.get_response()["id"] == "r-2"
    by_grpc = infer("grpc", (http, grpc_client), "grpo", arrays, request_id="r-3")
    assert by_grpc.get_response().id == "r-3" and by_grpc.get_response().model_version == "1"


# --- errors --------------------------------------------------------------------------------------------

NAN_LOGPROBS = {**{k: v for k, v in loss_arrays().items() if k in ("logprobs", "old_logprobs", "advantages",
                                                                      "response_mask")}}
NAN_LOGPROBS["logprobs"] = NAN_LOGPROBS["logprobs"].copy()
NAN_LOGPROBS["logprobs"][0, 0] = np.nan

BAD_REQUESTS = {  # id: (model, arrays, parameters, outputs, expected field, HTTP status)
    "wrong-datatype": ("grpo", {**grpo_arrays(), "rewards": np.array([b"1"] * 5, dtype=object)}, None, None,
                       "inputs.rewards", 400),
    "float-group-ids": ("grpo", {**grpo_arrays(), "group_ids": np.zeros(5, np.float32)}, None, None,
                        "inputs.group_ids", 400),
    "wrong-shape": ("grpo", {**grpo_arrays(), "rewards": np.ones(4, np.float32)}, None, None,
                    "inputs.rewards", 400),  # the odd one out: "'rewards' has B = 4 but 'response_mask' has B = 5"
    "missing-input": ("grpo", {k: v for k, v in grpo_arrays().items() if k != "group_ids"}, None, None,
                      "inputs.group_ids", 400),
    "input-not-of-the-model": ("grpo", {**grpo_arrays(), "values": np.ones(MASK.shape, np.float32)}, None, None,
                               "inputs.values", 400),
    "unknown-parameter": ("grpo", grpo_arrays(), {"bogus": 1.0}, None, "parameters.bogus", 400),
    "bad-parameter-value": ("grpo", grpo_arrays(), {"std_eps": -1.0}, None, "parameters.std_eps", 400),
    "unknown-preset": ("grpo", grpo_arrays(), {"preset": "nope"}, None, "parameters.preset", 404),
    "term-off-and-set": ("losses", NAN_LOGPROBS, {"kl_loss": False, "kl_loss.coef": 0.1}, None,
                         "parameters.kl_loss", 400),
    "unknown-output": ("grpo", grpo_arrays(), None, ["bogus"], "outputs.bogus", 400),
    "output-not-produced": ("losses", loss_arrays(), None, ["grad_values"], "outputs.grad_values", 400),
    "nan": ("losses", NAN_LOGPROBS, None, None, "inputs.logprobs", 400),
    "unknown-model": ("nope", grpo_arrays(), None, None, "model_name", 404),
}


@pytest.mark.parametrize("transport", ["http-binary", "grpc"])
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_malformed_requests_get_the_protocols_error(http, grpc_client, transport, case):
    model, arrays, parameters, outputs, field, status = BAD_REQUESTS[case]
    if case == "output-not-produced":
        arrays = {k: v for k, v in arrays.items() if k in ("logprobs", "old_logprobs", "advantages", "response_mask")}
    with pytest.raises(InferenceServerException) as err:
        infer(transport, (http, grpc_client), model, arrays, parameters, outputs)
    assert err.value.message().startswith(f"{field}:") or err.value.message().startswith(f"{field} "), \
        err.value.message()
    grpc_code = domain_errors.STATUS["not_found" if status == 404 else "invalid_argument"][1]
    assert err.value.status() == (str(status) if transport != "grpc" else f"StatusCode.{grpc_code}")


def post_binary(native, header: dict, buffers: list[bytes], header_length: int | None = None, **headers):
    text = json.dumps(header).encode()
    n = len(text) if header_length is None else header_length
    return native.post("/v2/models/grpo/infer", content=text + b"".join(buffers),
                       headers={"Inference-Header-Content-Length": str(n), **headers})


def test_bad_binary_sizes_and_bodies_over_http(native):
    rewards = np.array([1, 0, 1, 0, 1], np.float32)
    mask = MASK.astype(np.uint8)
    ids = np.array([3, 9, 3, 3, 9], np.int64)

    def header(rewards_size=20):
        return {"inputs": [
            {"name": "rewards", "datatype": "FP32", "shape": [5], "parameters": {"binary_data_size": rewards_size}},
            {"name": "response_mask", "datatype": "BOOL", "shape": [5, 4], "parameters": {"binary_data_size": 20}},
            {"name": "group_ids", "datatype": "INT64", "shape": [5], "data": ids.tolist()}]}

    ok = post_binary(native, header(), [rewards.tobytes(), mask.tobytes()])
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"] == "application/json"  # no binary output asked for
    cases = [
        (post_binary(native, header(16), [rewards.tobytes()[:16], mask.tobytes()]), "inputs.rewards"),
        (post_binary(native, header(), [rewards.tobytes(), mask.tobytes(), b"\0"]), "body"),
        (post_binary(native, header(), [rewards.tobytes(), mask.tobytes()[:-1]]), "inputs.response_mask"),
        (post_binary(native, header(), [rewards.tobytes(), mask.tobytes()], header_length=10 ** 6),
         "Inference-Header-Content-Length"),
        (post_binary(native, header(), [rewards.tobytes(), (mask * 2).tobytes()]), "inputs.response_mask"),
        (native.post("/v2/models/grpo/infer", content=b"{not json"), "body"),
        (native.post("/v2/models/grpo/infer", json={"inputs": [{"name": "rewards", "datatype": "FP32", "shape": [2],
                                                                 "data": [1.0, None]}]}), "inputs.rewards"),
        (native.post("/v2/models/grpo/infer", json={"inputs": [{"name": "rewards", "datatype": "FP32", "shape": [3],
                                                                 "data": [1.0, 2.0]}]}), "inputs.rewards"),
        (native.post("/v2/models/grpo/infer", json={"inputs": [], "extra": 1}), "extra"),
        (native.post("/v2/models/grpo/infer", json={"inputs": [{"name": "rewards", "datatype": "FP32", "shape": [1],
                                                                 "data": [1.0], "parameters": {
                                                                     "shared_memory_region": "x"}}]}),
         "inputs.rewards"),
        (native.post("/v2/models/grpo/infer", content=b"\x1f\x8b garbage", headers={"content-encoding": "gzip"}),
         "Content-Encoding"),
    ]
    for response, field in cases:
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/json"
        message = response.json()["error"]
        assert isinstance(message, str) and message.startswith(field), message


def test_bad_raw_contents_over_grpc(oip_server):
    """The stock stub with a raw_input_contents entry of the wrong size, or one entry too few."""
    request = triton_pb.ModelInferRequest(model_name="grpo")
    for name, datatype, shape in (("rewards", "FP32", [5]), ("response_mask", "BOOL", [5, 4]),
                                  ("group_ids", "INT64", [5])):
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend([np.ones(5, np.float32).tobytes(), MASK.tobytes(),
                                       np.zeros(4, np.int64).tobytes()])
    with grpc.insecure_channel(oip_server.grpc_address) as channel:
        stub = triton_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("inputs.group_ids: input 'group_ids': 32 bytes of data")
        del request.raw_input_contents[2]
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.details().startswith("raw_input_contents has 2 entries for 3 inputs")
        bad_bool = bytearray(MASK.tobytes())
        bad_bool[3] = 2
        request.raw_input_contents.extend([np.zeros(5, np.int64).tobytes()])
        request.raw_input_contents[1] = bytes(bad_bool)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=30)
        assert err.value.details() == "inputs.response_mask: tensor 'response_mask': bool bytes must be 0 or 1"
        # typed contents instead of raw bytes are accepted
        typed = triton_pb.ModelInferRequest(model_name="grpo")
        typed.inputs.add(name="rewards", datatype="FP64", shape=[5]).contents.fp64_contents.extend([1, 0, 1, 0, 1])
        typed.inputs.add(name="response_mask", datatype="BOOL", shape=[5, 4]).contents.bool_contents.extend(
            MASK.reshape(-1).tolist())
        typed.inputs.add(name="group_ids", datatype="BYTES", shape=[5]).contents.bytes_contents.extend(
            [b"p1", b"p2", b"p1", b"p1", b"p2"])
        response = stub.ModelInfer(typed, timeout=30)
    assert [o.name for o in response.outputs] == ["advantages", "returns"]
    advantages = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(MASK.shape)
    local = advserve.compute_advantages("grpo", rewards=np.array([1, 0, 1, 0, 1.0]), response_mask=MASK,
                                        group_ids=["p1", "p2", "p1", "p1", "p2"])
    np.testing.assert_array_equal(advantages, local.advantages)


@pytest.mark.parametrize("code", sorted(domain_errors.STATUS))
def test_the_error_table_on_the_protocols_http_body(code):
    error_class = next(c for c in (domain_errors.InvalidArgument, domain_errors.NotFound, domain_errors.Overloaded,
                                   domain_errors.Unavailable, domain_errors.Unauthenticated,
                                   domain_errors.DeadlineExceeded, domain_errors.PayloadTooLarge,
                                   domain_errors.RequestTimeout, domain_errors.MethodNotAllowed,
                                   domain_errors.AdvserveError) if c.code == code)
    response = oip_error_response(error_class("went wrong", field="inputs.x"))
    assert response.status_code == domain_errors.STATUS[code][0]
    assert json.loads(response.body) == {"error": "inputs.x: went wrong"}
    assert ("retry-after" in response.headers) == (response.status_code == 503)


# --- operations: auth, limits, metrics ------------------------------------------------------------------


def test_auth_body_limits_and_metrics():
    token = "oip-token-value"
    server = RunningServer("--max-json-bytes", "3000", "--max-body-bytes", "100000",
                           env={"ADVSERVE_AUTH_TOKEN": token})
    try:
        http = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        grpc_ = grpcclient.InferenceServerClient(server.grpc_address)
        clients = (http, grpc_)
        assert http.is_server_live() and http.is_server_ready()  # health is exempt
        assert grpc_.is_server_live() and grpc_.is_server_ready()
        for transport in ("http-binary", "grpc"):
            with pytest.raises(InferenceServerException) as err:
                infer(transport, clients, "grpo", grpo_arrays())
            assert err.value.status() in ("401", "StatusCode.UNAUTHENTICATED")
            result = infer(transport, clients, "grpo", grpo_arrays(), headers={"authorization": f"Bearer {token}"})
            assert result.as_numpy("advantages").shape == MASK.shape
        with pytest.raises(InferenceServerException) as err:
            http.get_model_metadata("grpo")
        assert err.value.status() == "401" and "bearer token" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            grpc_.get_server_metadata()
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        assert grpc_.get_model_metadata("grpo", headers={"authorization": f"Bearer {token}"}).name == "grpo"

        auth = {"authorization": f"Bearer {token}"}
        big_json = {"inputs": [{"name": "rewards", "datatype": "FP32", "shape": [1000], "data": [0.5] * 1000}]}
        response = httpx.post(f"{server.url}/v2/models/grpo/infer", json=big_json, headers=auth, timeout=30)
        assert response.status_code == 413 and "JSON" in response.json()["error"]
        # a JSON body is JSON whatever its Content-Type says: without Triton's header-length header the
        # JSON limit applies (an octet-stream label must not buy it the binary limit)
        response = httpx.post(f"{server.url}/v2/models/grpo/infer", content=json.dumps(big_json).encode(),
                              headers={**auth, "content-type": "application/octet-stream"}, timeout=30)
        assert response.status_code == 413 and "JSON" in response.json()["error"]
        big_binary = np.zeros(30000, np.float32)
        with pytest.raises(InferenceServerException) as err:
            infer("http-binary", clients, "grpo", {"rewards": big_binary, "response_mask": np.ones((30000, 1), bool),
                                                   "group_ids": np.zeros(30000, np.int64)},
                  headers=dict(auth))  # (tritonclient adds its own headers to the dict it is given)
        assert err.value.status() == "413" and "limit" in err.value.message()
        # a gzip body that inflates beyond the limit is refused too
        inflating = gzip.compress(json.dumps({"inputs": [], "id": "x" * 5000}).encode())
        response = httpx.post(f"{server.url}/v2/models/grpo/infer", content=inflating, timeout=30,
                              headers={**auth, "content-encoding": "gzip"})
        assert response.status_code == 413, response.text

        metrics = httpx.get(f"{server.url}/metrics", headers=auth).text
        assert 'advserve_requests_total{endpoint="advantages",estimator="grpo",status="200",transport="oip_http"}' \
            in metrics
        assert 'transport="oip_grpc"' in metrics and 'advserve_rejections_total{reason="unauthenticated",' \
            'transport="oip_http"}' in metrics
        http.close()
        grpc_.close()
    finally:
        server.stop()
    assert server.problems() == [], server.output()[-4000:]
    assert token not in server.output()


@pytest.mark.parametrize("doc", ["README.md", "docs/oip.md"])
def test_the_documented_example_runs(oip_server, doc, capsys):
    """The tritonclient example of the README and of docs/oip.md, against a live server, both
    transports, equal to the in-process API."""
    root = Path(__file__).resolve().parents[1]
    section = "## Open Inference Protocol" if doc == "README.md" else "## Example"
    code = (root / doc).read_text().split(section, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    for documented, actual in (("127.0.0.1:8000", oip_server.url.removeprefix("http://")),
                               ("127.0.0.1:8001", oip_server.grpc_address)):
        assert f'"{documented}"' in code
        code = code.replace(f'"{documented}"', repr(actual))
    exec(compile(code, doc, "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
    logp = np.log(np.full(mask.shape, 0.5, np.float32))
    adv = advserve.compute_advantages("grpo", preset="verl", rewards=np.array([1, 0, 0, 1], np.float32),
                                      response_mask=mask, group_ids=["q1"] * 4).advantages
    local = advserve.compute_losses(preset="verl", policy_loss={"clip_high": 0.28}, kl_loss={"coef": 0.001},
                                    logprobs=logp, old_logprobs=logp, ref_logprobs=logp, advantages=adv,
                                    response_mask=mask)
    assert float(lines[0].split()[0]) == local.loss


# --- fuzzing from the OpenAPI page ---------------------------------------------------------------------

OIP_INFER = "/v2/models/{model_name}/infer"
FUZZ_EXAMPLES = 40
FUZZ_DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "UINT64", "X"]


def _fuzz(operation, strategy, call) -> dict[int, int]:
    from hypothesis import HealthCheck, given, settings

    seen: dict[int, int] = {}

    @given(drawn=strategy)
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(drawn):
        status = call(drawn)
        seen[status] = seen.get(status, 0) + 1

    run()
    return seen


def _oip_document(draw, st) -> tuple[str, dict]:
    """A guided OIP request drawn from the native fuzzer's guided documents (real model, parameter
    and input names; shapes, datatypes and values that are sometimes wrong)."""
    from test_fuzz_openapi import guided_document

    endpoint = draw(st.sampled_from(["/v1/advantages", "/v1/losses"]))
    document, tensors, _, _ = draw(guided_document(endpoint))
    if endpoint == "/v1/advantages":
        model = document.pop("estimator")
        parameters = {**(document.pop("params", None) or {}), **document}
    else:
        model, parameters = "losses", {}
        for key, value in document.items():
            if isinstance(value, dict):
                parameters.update({f"{key}.{name}": v for name, v in value.items()})
            elif value is not None:
                parameters[key] = value
    if draw(st.integers(0, 9)) == 9:  # (Hypothesis prefers the smallest integer: the usual case)
        model = draw(st.sampled_from(["nope", "losses", "grpo"]))
    inputs = []
    for name, value in tensors.items():
        try:
            array = np.asarray(value)
        except ValueError:
            array = np.asarray([0])
        usual = "BOOL" if name == "response_mask" else "INT64" if name in ("group_ids", "cu_seqlens") else "FP32"
        if array.dtype.kind == "U":
            usual = "BYTES"
        datatype = draw(st.sampled_from([usual] * 6 + FUZZ_DATATYPES))
        shape = list(array.shape) if draw(st.integers(0, 9)) < 9 else draw(st.lists(st.integers(0, 6), max_size=3))
        data = array.reshape(-1).tolist() if array.dtype != object else value
        inputs.append({"name": name, "datatype": datatype, "shape": shape, "data": data})
    return model, {"inputs": inputs, "parameters": parameters}


def _binary(model: str, document: dict, draw, st) -> tuple[bytes, int]:
    """The same request with inputs binary where the data converts to the datatype; sometimes damaged."""
    from advserve.oip.tensors import DATATYPES

    buffers = []
    for entry in document["inputs"]:
        datatype = DATATYPES.get(entry["datatype"])
        if datatype is None or datatype.numpy is None or draw(st.integers(0, 5)) == 5:
            continue
        try:
            with np.errstate(all="ignore"):
                raw = np.asarray(entry["data"], dtype=np.float64).astype(datatype.numpy).tobytes()
        except (ValueError, TypeError):
            continue
        if draw(st.integers(0, 9)) == 9:
            raw = draw(st.binary(max_size=len(raw) + 2))
        entry["parameters"] = {"binary_data_size": len(raw)}
        del entry["data"]
        buffers.append(raw)
    header = json.dumps(document).encode()
    n = len(header) if draw(st.integers(0, 9)) < 9 else draw(st.integers(-1, len(header) + 5))
    return header + b"".join(buffers), n


def test_fuzz_oip_infer(oip_server):
    """Schemathesis' cases of POST /v2/models/{model_name}/infer (schema-valid and -invalid), then
    guided ones as JSON and binary: never a 5xx, the documented statuses and error bodies; the server
    stays healthy (its log is checked when the module ends)."""
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{oip_server.url}/openapi.json", timeout=10)
    operation = schema[OIP_INFER]["POST"]
    excluded = [positive_data_acceptance]  # schema-valid bodies are rightly refused when names are wrong
    for mode in ("positive", "negative"):
        seen = _fuzz(operation, operation.as_strategy(GenerationMode(mode)),
                     lambda case: case.call_and_validate(excluded_checks=excluded, timeout=10).status_code)
        assert seen and all(status < 500 for status in seen), (mode, seen)

    for kind in ("json", "binary"):
        media_type = "application/json" if kind == "json" else "application/octet-stream"
        cases = operation.as_strategy(GenerationMode.POSITIVE).filter(lambda case: case.media_type == media_type)

        @st.composite
        def guided(draw):
            case = draw(cases)
            model, document = _oip_document(draw, st)
            case.path_parameters = {"model_name": model}
            if kind == "json":
                case.body = document
                return case, None
            case.body, n = _binary(model, document, draw, st)
            return case, {"Inference-Header-Content-Length": str(n)}

        def call(drawn):
            case, headers = drawn
            return case.call_and_validate(headers=headers, excluded_checks=excluded, timeout=10).status_code

        seen = _fuzz(operation, guided(), call)
        assert all(status < 500 for status in seen), (kind, seen)
        assert 400 in seen, (kind, seen)
    with httpx.Client(base_url=oip_server.url, timeout=30) as client:
        assert client.get("/v2/health/ready").status_code == 200


def test_null_text_for_a_nullable_string_parameter(http, grpc_client):
    """"null" for kl_loss.agg (a nullable string: openrlhf's default is token-mean) means null, the
    policy term's aggregation, as the JSON null of the native API."""
    arrays = loss_arrays()
    arrays.pop("values"), arrays.pop("old_values"), arrays.pop("returns")
    parameters = {"preset": "openrlhf", "policy_loss.agg": "seq-mean-token-mean", "kl_loss.agg": "null"}
    local = advserve.compute_losses(preset="openrlhf", policy_loss={"agg": "seq-mean-token-mean"},
                                    kl_loss={"agg": None}, **arrays)
    token_mean = advserve.compute_losses(preset="openrlhf", policy_loss={"agg": "seq-mean-token-mean"},
                                         kl_loss={}, **arrays)
    assert local.loss != token_mean.loss  # the parameter matters here
    for transport in ("http-binary", "grpc"):
        result = infer(transport, (http, grpc_client), "losses", arrays, {**parameters, "kl_loss": True})
        assert result.as_numpy("loss")[0] == pytest.approx(local.loss, rel=1e-6)
