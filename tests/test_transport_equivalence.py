"""Every transport is the same function: for random batches, every estimator under every preset and every
policy loss mode with any loss terms gives the same numbers over REST JSON, REST binary framing, native
gRPC, /v2 HTTP (binary and JSON) and /v2 gRPC as the in-process API, and every invalid request the same
error code and field.

"The same numbers" is exact: every tensor bit for bit (dtype, shape, signed zeros), the loss, components,
metrics, resolved parameters and statistics equal as floats. No transport changes a dtype, and JSON
round-trips floats exactly (the server prints the shortest repr). What a transport does not carry is not
compared (docs/oip.md: /v2 returns no statistics and no null parameters; client/README.md: gRPC returns
group ids as strings; /v2 JSON has no NaN, so batches holding NaN/Inf garbage skip it, and no /v2 tensor
holds ids of two kinds, which the native clients refuse as the server does).

The batches, the transports' calls and the comparison are those of the differential fuzzer
(scripts/fuzz_transports.py), driven here by Hypothesis (choices shrink; tensor contents come from a
drawn seed). One session server (conftest's `server`) serves every transport; requests go one at a
time (the fuzzer's smoke run at the end also sends concurrent bursts, which the server may coalesce).
"""

from __future__ import annotations

import concurrent.futures
import sys
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import advserve
from advserve_client import Client, InvalidArgument
from advserve_client import _grpc as client_grpc
from advserve_client import _http as client_http
from advserve_client.framing import RawTensor
from conftest import ROOT, RunningServer

sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_transports as fz  # noqa: E402

# Examples per parametrized case: about 1,300 in all, each sent over eight transports (under a minute on two
# cores): the native clients also with shared_memory=True, their tensors in regions instead of the messages.
ADVANTAGE_EXAMPLES = 20
LOSS_EXAMPLES = 20
INVALID_EXAMPLES = 16
SLOW = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# variants that are wrong whatever else was drawn (wrong_shape, missing_tensor and unknown_tensor may hit
# a tensor the request does not need: the transports must still agree)
ALWAYS_INVALID = ("nan_unmasked", "inf_unmasked", "unknown_estimator", "unknown_preset", "unknown_param",
                  "bad_param_value", "empty_batch", "singleton_refused", "bad_mask", "estimator_not_in_preset",
                  "unknown_choice", "mixed_ids", "long_id", "bad_rank", "bad_cu_seqlens", "text_tensor",
                  "wrong_type_param")


@pytest.fixture(scope="module")
def transports(server):
    made = fz.Transports(server.url, server.grpc_address, timeout=30.0)
    yield made
    made.close()


def same_everywhere(transports: fz.Transports, case: fz.Case) -> fz.Outcome:
    """The in-process outcome, after checking that every transport gives it."""
    expected = fz.in_process(case)
    failures = {}
    for name in transports.names:
        if fz.applicable(name, case):
            got = transports.call(name, case)
            found = fz.differences(fz.expected_over(name, case, expected), got)
            if found:
                failures[name] = found
    assert not failures, f"{case.repro()}\nin process: {expected.brief()}\n" + "\n".join(
        f"{name}: {'; '.join(found[:4])}" for name, found in failures.items())
    return expected


PAIRS = fz.estimator_presets()


@pytest.mark.parametrize("estimator,preset", PAIRS, ids=[f"{e}-{p}" for e, p in PAIRS])
@settings(SLOW, max_examples=ADVANTAGE_EXAMPLES)
@given(data=st.data())
def test_every_estimator_is_the_same_function_over_every_transport(transports, estimator, preset, data):
    same_everywhere(transports, fz.advantage_case(fz.HypothesisDraw(data), estimator, preset))


# the classic modes and "any mode" under every preset; each of verl's other modes under one preset in turn
# (a drawn "any mode" case reaches every mode under every preset too)
LOSS_CASES = [(mode, preset) for mode in (*fz.CLASSIC_MODES, None) for preset in fz.PRESETS] + [
    (mode, fz.PRESETS[i % len(fz.PRESETS)]) for i, mode in enumerate(m for m in fz.MODES if m not in fz.CLASSIC_MODES)]


@pytest.mark.parametrize("mode,preset", LOSS_CASES, ids=[f"{m or 'any'}-{p}" for m, p in LOSS_CASES])
@settings(SLOW, max_examples=LOSS_EXAMPLES)
@given(data=st.data())
def test_every_loss_is_the_same_function_over_every_transport(transports, mode, preset, data):
    """mode None: any mode, or no policy term; the other terms on or off, with drawn parameters."""
    same_everywhere(transports, fz.loss_case(fz.HypothesisDraw(data), mode, preset))


@pytest.mark.parametrize("variant", fz.INVALID)
@settings(SLOW, max_examples=INVALID_EXAMPLES)
@given(data=st.data())
def test_invalid_requests_get_the_same_error_everywhere(transports, variant, data):
    same_error_everywhere(transports, variant, data)


def same_error_everywhere(transports: fz.Transports, variant: str, data) -> None:
    """A drawn invalid request of `variant` gets the in-process error over every transport; one that is
    wrong whatever else was drawn is refused, its field named."""
    expected = same_everywhere(transports, fz.invalid_case(fz.HypothesisDraw(data), variant))
    if variant in ALWAYS_INVALID:
        assert expected.error is not None and expected.error[0] in ("invalid_argument", "not_found"), expected.brief()
        assert expected.error[1], f"the error names no field: {expected.message}"


# --- value checks read with the results, as on a GPU ------------------------------------------------------
# On a device the value checks' verdicts are read with the results, one sync per request
# (`Engine.prepare_advantages(defer_checks=True)`; tests/test_device_syncs.py). The CPU reads them at once,
# so the properties above never see that path. Here a server (and the in-process API) takes the branches a
# GPU takes, and must still give the in-process numbers and errors of the CPU's immediate reads.

CHECKS_READ_LATE = ("import sys; import advserve.engine as engine, advserve.functional.masks as masks; "
                    "masks.host_reads_are_free = engine.host_reads_are_free = lambda device: False; "
                    "from advserve.cli import main; main(sys.argv[1:])")
LATE_EXAMPLES = 40
LATE_INVALID_EXAMPLES = 4


@pytest.fixture(scope="module")
def late_transports():
    """The transports of a server whose engine reads the value checks with the results, as on a GPU."""
    server = RunningServer(name="advserve-checks-late", argv=lambda http_port, grpc_port: [
        sys.executable, "-c", CHECKS_READ_LATE, "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-port", str(grpc_port), "--log-level", "warning", "--workers", "1"])
    made = fz.Transports(server.url, server.grpc_address, timeout=30.0)
    yield made
    made.close()
    server.stop()


@settings(SLOW, max_examples=LATE_EXAMPLES)
@given(data=st.data())
def test_checks_read_with_the_results_give_the_same_numbers(late_transports, data):
    """Any estimator and preset, any loss: the numbers of the immediate reads, over every transport."""
    draw = fz.HypothesisDraw(data)
    if data.draw(st.booleans(), label="losses"):
        same_everywhere(late_transports, fz.loss_case(draw))
    else:
        estimator, preset = data.draw(st.sampled_from(PAIRS), label="estimator, preset")
        same_everywhere(late_transports, fz.advantage_case(draw, estimator, preset))


@pytest.mark.parametrize("variant", fz.INVALID)
@settings(SLOW, max_examples=LATE_INVALID_EXAMPLES)
@given(data=st.data())
def test_checks_read_with_the_results_give_the_same_errors(late_transports, variant, data):
    same_error_everywhere(late_transports, variant, data)


# --- the Triton kernels' checks ------------------------------------------------------------------------------
# With kernels "triton" (a GPU's default) the mask and the token tensors are checked by kernels
# (`kernels/validate.py`), not by the torch path. A server running them under Triton's interpreter, as on a
# GPU (the checks read with the results), must refuse what the CPU refuses, with the same error and field,
# over every transport. Its numbers differ from the CPU's by rounding (tests/test_kernels.py holds
# them to the torch path), so a request the CPU computes must only compute here too.

TRITON_INVALID_EXAMPLES = 3


@pytest.fixture(scope="module")
def triton_transports():
    """The transports of a server whose engine runs the Triton kernels (interpreted) on the GPU's branches."""
    server = RunningServer(name="advserve-triton-interpreted", env={"TRITON_INTERPRET": "1"},
                           argv=lambda http_port, grpc_port: [
        sys.executable, "-c", CHECKS_READ_LATE, "serve", "--host", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-port", str(grpc_port), "--log-level", "warning", "--workers", "1", "--kernels", "triton"])
    made = fz.Transports(server.url, server.grpc_address, timeout=60.0)
    yield made
    made.close()
    server.stop()


@pytest.mark.parametrize("variant", fz.INVALID)
@settings(SLOW, max_examples=TRITON_INVALID_EXAMPLES)
@given(data=st.data())
def test_the_triton_kernels_checks_give_the_same_errors(triton_transports, variant, data):
    case = fz.invalid_case(fz.HypothesisDraw(data), variant)
    expected = fz.in_process(case)
    failures = {}
    for name in triton_transports.names:
        if fz.applicable(name, case):
            wanted = fz.expected_over(name, case, expected)
            got = triton_transports.call(name, case)
            if wanted.error is None:  # computed: by the kernels, to rounding
                found = [] if got.error is None and not got.exception and not got.server_error else \
                    [f"not computed: {got.error or got.exception or got.status} {got.message[:200]}"]
            else:  # the error's code and field, as the properties above compare them
                found = fz.differences(wanted, got)
            if found:
                failures[name] = found
    assert not failures, f"{case.repro()}\nin process: {expected.brief()}\n" + "\n".join(
        f"{name}: {'; '.join(found[:4])}" for name, found in failures.items())


@settings(SLOW, max_examples=LATE_EXAMPLES)
@given(data=st.data())
def test_the_in_process_api_reading_checks_with_the_results_is_the_same_function(data):
    """The in-process API as on a GPU (compute_advantages reads the checks before it returns) against
    itself on the CPU, for valid and invalid requests."""
    from advserve import engine, functional

    draw = fz.HypothesisDraw(data)
    kind = data.draw(st.sampled_from(["advantages", "losses", "invalid"]), label="kind")
    case = (fz.advantage_case(draw) if kind == "advantages" else fz.loss_case(draw) if kind == "losses"
            else fz.invalid_case(draw))
    expected = fz.in_process(case)
    with pytest.MonkeyPatch.context() as patch:
        for module in (functional.masks, engine):
            patch.setattr(module, "host_reads_are_free", lambda device: False)
        got = fz.in_process(case)
    assert not fz.differences(expected, got), (case.repro(), fz.differences(expected, got))
    assert (got.error is None) == (expected.error is None) and got.message == expected.message


def test_the_generated_batches_cover_what_the_property_claims():
    """The generators draw what the tests above promise (B 1-40, T 1-70 with T > 16 not a multiple of 16,
    ragged, one-token and gapped rows, int and string ids, singleton and all-equal groups, both dtypes and
    layouts), and most valid requests compute: the property is not vacuous."""
    from advserve.batch import TOKEN_TENSORS

    # every token tensor of the engine is one the generators pack (a packed sum_pi_squared was left [B, T])
    assert set(fz.TOKEN_TENSORS) == TOKEN_TENSORS - {"response_mask"}
    seen: dict[str, int] = {}

    def note(key: str, yes: bool = True) -> None:
        seen[key] = seen.get(key, 0) + bool(yes)

    for seed in range(300):
        draw = fz.RandomDraw(seed)
        case = fz.advantage_case(draw) if seed % 3 else fz.loss_case(draw)
        t = case.tensors
        packed = case.document.get("layout") == "packed"
        note("packed", packed)
        mask = t.get("response_mask")
        if not packed:
            b, width = mask.shape
            lengths = mask.sum(1)
            note("T>16 not a multiple of 16", width > 16 and width % 16)
            note("B>=30", b >= 30)
            note("ragged", len(set(lengths.tolist())) > 1)
            note("one-token row", (lengths == 1).any())
            spans = width - np.argmax(mask[:, ::-1], axis=1)
            note("interior gap", (mask.any(1) & (lengths < spans)).any())
        ids = t.get("group_ids")
        if ids is not None:
            note("string ids", isinstance(ids, list))
            note("int ids", isinstance(ids, np.ndarray))
            counts = np.unique(np.asarray([str(i) for i in ids]), return_counts=True)[1]
            note("singleton group", (counts == 1).any())
            note("all equal", len(counts) == 1 and len(ids) > 1)
        note("float32 inputs", any(getattr(v, "dtype", None) == np.float32 for v in t.values()))
        note("float64 compute", case.document.get("dtype") == "float64")
        note("masked garbage", case.non_finite())
        note(f"{case.kind} computes", fz.in_process(case).error is None)
        note(f"{case.kind} drawn")
    for key in ("packed", "T>16 not a multiple of 16", "B>=30", "ragged", "one-token row", "interior gap",
                "string ids", "int ids", "singleton group", "all equal", "float32 inputs", "float64 compute",
                "masked garbage"):
        assert seen.get(key, 0) >= 5, (key, seen)
    for kind in ("advantages", "losses"):
        assert seen[f"{kind} computes"] >= 0.6 * seen[f"{kind} drawn"], seen


# --- the JSON client and non-finite numbers (JSON has no NaN) ----------------------------------------------


def test_the_json_client_sends_nan_and_inf_as_null():
    values = np.array([[0.5, 1.0, np.nan], [2.0, np.inf, -np.inf]], np.float32)
    _, (body,) = client_http._encode({"estimator": "gae"}, {"values": RawTensor.from_numpy(values)}, binary=False)
    assert body == b'{"estimator":"gae","tensors":{"values":[[0.5,1.0,null],[2.0,null,null]]}}'
    with pytest.raises(InvalidArgument) as info:
        client_http._encode({"policy_loss": {"clip_high": float("inf")}}, {}, binary=False)
    assert info.value.field == "policy_loss.clip_high"


def test_nan_garbage_and_nan_errors_read_the_same_in_json_mode(server):
    """Ignored garbage at masked positions computes as it does in process; NaN at an unmasked position
    and a non-finite parameter are the in-process errors, field and all."""
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
    values = np.where(mask, rng.normal(size=mask.shape), np.nan)
    tensors = {"rewards": np.array([1.0, 0.0, 2.0]), "response_mask": mask, "values": values}
    local = advserve.compute_advantages("gae", **tensors)
    with Client(server.url, binary=False) as client:
        result = client.compute_advantages("gae", **tensors)
        np.testing.assert_array_equal(result.advantages, local.advantages)
        for bad, field in ((dict(tensors, values=np.where(mask, np.nan, 0.0)), "tensors.values"),
                           (dict(tensors, params={"gamma": float("nan")}), "params.gamma")):
            with pytest.raises(advserve.InvalidArgument) as in_process:
                advserve.compute_advantages("gae", **bad)
            with pytest.raises(InvalidArgument) as over_json:
                client.compute_advantages("gae", **bad)
            assert in_process.value.field == over_json.value.field == field


@pytest.mark.parametrize("params", [{"whiten_std": 7}, {"whiten": 0}, {"gamma": True}, {"whiten_ddof": 1.0},
                                    {"whiten_ddof": 1.5}, {"whiten_ddof": True}, {"kl_estimator": 3}, {"gamma": "0.5"},
                                    {"gamma": 1}])
def test_the_grpc_client_types_parameters_as_the_server_does(params):
    """protobuf would take 7 for a bool and True for a double: the gRPC client refuses what the server
    refuses (same field) and sends what it accepts (1.0 for an integer parameter is 1)."""
    tensors = {"rewards": np.array([1.0, 0.0]), "response_mask": np.ones((2, 3), bool), "values": np.zeros((2, 3))}
    try:
        advserve.compute_advantages("gae", params=params, **tensors)
        refused = None
    except advserve.InvalidArgument as exc:
        refused = exc.field
    wire = {name: RawTensor.from_numpy(value) for name, value in tensors.items()}
    if refused is None:
        request = client_grpc.advantages_request({"estimator": "gae", "params": params}, wire)
        (name, value), = params.items()
        assert getattr(request.params, name) == value
    else:
        with pytest.raises(InvalidArgument) as info:
            client_grpc.advantages_request({"estimator": "gae", "params": params}, wire)
        assert info.value.field == refused


# --- bursts: what else is queued changes nothing --------------------------------------------------------


def test_a_request_that_expires_in_the_queue_does_not_stop_the_server():
    """Found by the fuzzer's bursts: while the compute thread waits for companions of a GRPO job
    (--max-wait-ms), two GAE jobs queue and the second one's deadline (/v2 `timeout`, 0.1 s) passes. Dropping
    it must not disturb the others: every request still gets its in-process answer, and later ones too."""
    server = RunningServer("--max-wait-ms", "1000")
    try:
        def gae(width: int, timeout_us: int | None = None) -> httpx.Response:
            body = {"parameters": {"timeout": timeout_us} if timeout_us else {}, "inputs": [
                {"name": "rewards", "datatype": "FP64", "shape": [2], "data": [1.0, 0.0]},
                {"name": "response_mask", "datatype": "BOOL", "shape": [2, width], "data": [True] * (2 * width)},
                {"name": "values", "datatype": "FP64", "shape": [2, width], "data": [0.5] * (2 * width)}]}
            return httpx.post(f"{server.url}/v2/models/gae/infer", json=body, timeout=10)

        grpo = {"rewards": np.array([1.0, 0.0]), "response_mask": np.ones((2, 3), bool), "group_ids": [1, 1]}
        with Client(server.url, timeout=10, max_retries=0) as client, \
                concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(client.compute_advantages, "grpo", **grpo)
            time.sleep(0.1)  # (only orders the arrivals; nothing is timed)
            kept = pool.submit(gae, 9)
            time.sleep(0.1)
            expired = pool.submit(gae, 7, 100_000)
            local = advserve.compute_advantages("grpo", **grpo)
            np.testing.assert_array_equal(first.result().advantages, local.advantages)
            assert kept.result().status_code == 200
            assert expired.result().status_code in (200, 504)
            np.testing.assert_array_equal(client.compute_advantages("grpo", **grpo).advantages, local.advantages)
    finally:
        server.stop()
    assert not [line for line in server.problems() if "advserve-compute" in line or "Traceback" in line], \
        server.output()[-3000:]


# --- the fuzzer, briefly ----------------------------------------------------------------------------------


def test_fuzz_campaign_smoke(transports):
    """The fuzzer's campaign, 20 requests per transport, some in concurrent bursts: no 5xx, no disagreement."""
    summary = fz.run_campaign(transports, requests=20, seed=7, burst_share=0.3)
    assert summary["aborted"] is None, summary["aborted"]
    for name, tally in summary["transports"].items():
        assert tally["requests"] >= 20, name
        assert tally["server_errors"] == tally["exceptions"] == tally["timeouts"] == 0 and not tally["kinds"], \
            (name, tally["kinds"], tally["examples"])
