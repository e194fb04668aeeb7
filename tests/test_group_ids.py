"""Group ids: factorized in order of first appearance, never widened to a fixed width, bounded in
length (MAX_GROUP_ID_LENGTH), one kind at a time (1 and "1" are a 400, not one group), on every
transport.

One id of 1,000,000 characters among 256 rows used to take 3-4 GB and 8-26 s (numpy widened every id
to the longest), among 20,000 rows a 74.5 GiB allocation that failed with a 500.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import torch

import advserve
from advserve.batch import MAX_GROUP_ID_LENGTH, _group_index
from advserve_client import Client
from advserve_client import InvalidArgument as ClientInvalidArgument
from conftest import RunningServer

LONG = "x" * 1_000_000


def first_appearance(ids: list) -> tuple[list[int], list]:
    """The reference: a plain loop numbering ids as they first appear."""
    codes: dict = {}
    for i in ids:
        codes.setdefault(i, len(codes))
    return [codes[i] for i in ids], list(codes)


@pytest.mark.parametrize("ids", [
    ["b", "a", "b", "c", "a"],
    [7, 3, 7, 7, -1, 3],
    ["uuid-" + "9" * 30, "uuid-1", "uuid-" + "9" * 30],  # ragged lengths
    ["é", "e", "é", "", ""],
    [b"\x00a", b"a", b"a\x00", b"a"],  # trailing and leading NUL bytes are part of the id
])
def test_index_and_labels_in_order_of_first_appearance(ids):
    index, labels = first_appearance(ids)
    kinds = [ids, tuple(ids), np.array(ids, dtype=object)]
    if not isinstance(ids[0], bytes):
        kinds.append(np.array(ids))  # numpy str / int64
    if isinstance(ids[0], int):
        kinds.append(torch.tensor(ids))
    for given in kinds:
        got_index, (sizes, order, starts), got_labels = _group_index(given, torch.device("cpu"), layout=True)
        assert _group_index(given, torch.device("cpu"))[1] is None  # only when asked for
        assert got_index.dtype == torch.long and got_index.tolist() == index, type(given)
        assert got_labels == labels and [type(label) for label in got_labels] == [type(label) for label in labels]
        # the layout computed on the host is what the device would compute (functional.groups.Groups)
        expected = torch.tensor(index)
        assert sizes.tolist() == torch.bincount(expected).tolist()
        assert order.tolist() == torch.argsort(expected, stable=True).tolist()
        assert starts.tolist() == (torch.cumsum(sizes, 0) - sizes).tolist()


def test_string_groups_give_the_same_advantages_as_int_groups():
    rewards = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.25])
    mask = np.ones((6, 3), bool)
    as_ints = advserve.compute_advantages("grpo", rewards=rewards, response_mask=mask, group_ids=[5, 2, 5, 2, 9, 9])
    as_strs = advserve.compute_advantages("grpo", rewards=rewards, response_mask=mask,
                                          group_ids=["p5", "p2", "p5", "p2", "p9", "p9"])
    np.testing.assert_array_equal(as_ints.advantages, as_strs.advantages)
    assert as_strs.stats["groups"]["ids"] == ["p5", "p2", "p9"] and as_ints.stats["groups"]["ids"] == [5, 2, 9]


def batch(ids) -> dict:
    n = len(ids)
    return {"rewards": np.linspace(0, 1, n), "response_mask": np.ones((n, 2), bool), "group_ids": ids}


@pytest.mark.parametrize("ids,words", [
    ([1, "1"], "mix integers and strings"),
    (np.array([1, "1"], dtype=object), "mix integers and strings"),
    (["a", b"a"], "mix integers and strings"),
    ([True, False], "booleans"),
    ([1.0, 2.0], "floats"),
    (np.array([1.5, 2.5]), "floats"),
    (torch.tensor([1.0, 2.0]), "floats"),
    ([None, 1], "null"),
    ([[1], [2]], "[B]"),
    (np.zeros((2, 1), np.int64), "[B]"),
    (["a", "b" * (MAX_GROUP_ID_LENGTH + 1)], f"at most {MAX_GROUP_ID_LENGTH}"),
    (np.array(["a", "b" * (MAX_GROUP_ID_LENGTH + 1)]), f"at most {MAX_GROUP_ID_LENGTH}"),
    (["a", "é" * (MAX_GROUP_ID_LENGTH // 2 + 1)], f"at most {MAX_GROUP_ID_LENGTH}"),  # bytes in UTF-8, as /v2 has them
])
def test_bad_ids_are_a_400_naming_group_ids(ids, words):
    with pytest.raises(advserve.InvalidArgument) as err:
        advserve.compute_advantages("dr_grpo", **batch(ids))
    assert err.value.field == "tensors.group_ids" and words in str(err.value)


def test_an_id_of_the_maximum_length_is_fine():
    for long in ("a" * MAX_GROUP_ID_LENGTH, "é" * (MAX_GROUP_ID_LENGTH // 2)):
        result = advserve.compute_advantages("dr_grpo", **batch([long, "b", long, "b"]))
        assert result.stats["groups"]["count"] == 2


MEASURE = r"""
import json, resource, sys
import numpy as np
import advserve

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

out = {}
advserve.compute_advantages("dr_grpo", rewards=np.ones(2), response_mask=np.ones((2, 1), bool), group_ids=[0, 0])
for rows in (256, 20_000):
    ids = [f"q{i % 16}" for i in range(rows)]
    ids[rows // 2] = "x" * 1_000_000
    before = peak_mb()
    try:
        advserve.compute_advantages("dr_grpo", rewards=np.ones(rows), response_mask=np.ones((rows, 1), bool),
                                    group_ids=ids)
        out[rows] = ["ok", None]
    except advserve.InvalidArgument as exc:
        out[rows] = [exc.field, peak_mb() - before]
rewards = [0.5] * 256  # the same string in a numeric tensor: refused before numpy widens it (1 GB, 2.5 s)
rewards[7] = "x" * 1_000_000
before = peak_mb()
try:
    advserve.compute_advantages("dr_grpo", rewards=rewards, response_mask=np.ones((256, 1), bool), group_ids=[0] * 256)
    out["rewards"] = ["ok", None]
except advserve.InvalidArgument as exc:
    out["rewards"] = [exc.field, peak_mb() - before]
ids = [f"{i:01024d}" for i in range(20_000)]  # 20,000 distinct ids of the maximum length (20 MB of text)
before = peak_mb()
result = advserve.compute_advantages("dr_grpo", rewards=np.ones(20_000), response_mask=np.ones((20_000, 1), bool),
                                     group_ids=ids)
out["max"] = [result.stats["groups"]["count"], peak_mb() - before]
print(json.dumps(out))
"""


def test_long_ids_cost_no_memory_in_process():
    """Peak RSS growth (a fresh process): a 1,000,000-character id (or such a string in a numeric
    tensor) is refused before anything of its size times B exists; 20,000 ids of the maximum length factorize without a [B] fixed-width copy
    (which would be 20,000 x 1024 x 4 bytes = 78 MiB)."""
    done = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    for rows in ("256", "20000"):
        field, grown = out[rows]
        assert field == "tensors.group_ids" and grown < 32, out
    field, grown = out["rewards"]
    assert field == "tensors.rewards" and grown < 32, out
    count, grown = out["max"]
    assert count == 20_000 and grown < 40, out


# --- the transports -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    running = RunningServer()
    yield running
    running.stop()


def rest_body(ids: list) -> dict:
    n = len(ids)
    return {"estimator": "dr_grpo", "tensors": {"rewards": [float(i % 2) for i in range(n)],
                                                 "response_mask": [[1, 1]] * n, "group_ids": ids}}


def test_rest_json(server):
    ids = [f"q{i % 16}" for i in range(20_000)]
    ids[10_000] = LONG
    response = httpx.post(f"{server.url}/v1/advantages", json=rest_body(ids), timeout=120)
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["field"] == "tensors.group_ids" and str(MAX_GROUP_ID_LENGTH) in error["message"]
    response = httpx.post(f"{server.url}/v1/advantages", json=rest_body([1, "1", 2, 2]), timeout=60)
    assert response.status_code == 400 and response.json()["error"]["field"] == "tensors.group_ids"
    response = httpx.post(f"{server.url}/v1/advantages", json=rest_body(["b", "a", "b", "a"]), timeout=60)
    assert response.status_code == 200 and response.json()["stats"]["groups"]["ids"] == ["b", "a"]


def test_native_grpc(server):
    ids = [f"q{i % 16}" for i in range(256)]
    ids[100] = LONG
    with Client(server.grpc_address, transport="grpc", max_retries=0) as client:
        with pytest.raises(ClientInvalidArgument) as err:
            client.compute_advantages("dr_grpo", rewards=np.ones(256), response_mask=np.ones((256, 2), bool),
                                      group_ids=ids)
        assert err.value.field == "tensors.group_ids"
        ok = client.compute_advantages("dr_grpo", rewards=np.array([1.0, 0.0, 1.0]),
                                       response_mask=np.ones((3, 2), bool), group_ids=["a" * 1024, "b", "a" * 1024])
        assert ok.stats["groups"]["count"] == 2


def v2_inputs(n: int) -> list[dict]:
    return [{"name": "rewards", "datatype": "FP32", "shape": [n], "data": [float(i % 2) for i in range(n)]},
            {"name": "response_mask", "datatype": "BOOL", "shape": [n, 1], "data": [True] * n}]


def test_v2_json_bytes(server):
    ids = [f"q{i % 16}" for i in range(20_000)]
    ids[5] = LONG
    body = {"inputs": [*v2_inputs(len(ids)), {"name": "group_ids", "datatype": "BYTES", "shape": [len(ids)],
                                               "data": ids}]}
    response = httpx.post(f"{server.url}/v2/models/dr_grpo/infer", json=body, timeout=120)
    assert response.status_code == 400, response.text[:500]
    assert "inputs.group_ids" in response.json()["error"]


def test_v2_binary_bytes(server):
    """Triton's BYTES serialization (4-byte length, bytes), ragged (the element-by-element path) and of
    one length (the vectorized path): a long element is a 400 naming the input; good ids group alike."""
    def post(elements: list[bytes]):
        data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
        header = {"inputs": [*v2_inputs(len(elements)),
                             {"name": "group_ids", "datatype": "BYTES", "shape": [len(elements)],
                              "parameters": {"binary_data_size": len(data)}}],
                  "outputs": [{"name": "advantages", "parameters": {"binary_data": False}}]}
        text = json.dumps(header).encode()
        return httpx.post(f"{server.url}/v2/models/dr_grpo/infer", content=text + data,
                          headers={"Inference-Header-Content-Length": str(len(text))}, timeout=120)

    for elements in ([b"a", LONG.encode(), b"a"], [LONG.encode()] * 2):
        response = post(elements)
        assert response.status_code == 400, response.text[:500]
        assert "inputs.group_ids" in response.json()["error"]
    ragged, even = post([b"long-prompt", b"p", b"long-prompt", b"p"]), post([b"q1", b"q2", b"q1", b"q2"])
    assert ragged.status_code == even.status_code == 200
    utf8 = ("é" * (MAX_GROUP_ID_LENGTH // 2)).encode()  # the limit in bytes, as the native API counts it
    assert post([utf8, b"p", utf8, b"p"]).json()["outputs"][0]["data"] == even.json()["outputs"][0]["data"]
    assert ragged.json()["outputs"][0]["data"] == even.json()["outputs"][0]["data"]


def test_v2_grpc_bytes_contents(server):
    from tritonclient.grpc import service_pb2 as triton_pb
    from tritonclient.grpc import service_pb2_grpc as triton_grpc

    request = triton_pb.ModelInferRequest(model_name="dr_grpo")
    request.inputs.add(name="rewards", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1.0, 0.0, 1.0])
    request.inputs.add(name="response_mask", datatype="BOOL", shape=[3, 1]).contents.bool_contents.extend([True] * 3)
    request.inputs.add(name="group_ids", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
        [b"a", b"x" * (MAX_GROUP_ID_LENGTH + 1), b"a"])
    with grpc.insecure_channel(server.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            triton_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs.group_ids" in err.value.details()
