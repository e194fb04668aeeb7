"""OIP benchmark: the Open Inference Protocol (/v2 and inference.GRPCInferenceService) against advserve's
native API, on one server over loopback, with raw requests and with the stock clients.

    .venv/bin/python bench/bench_oip.py            # full sizes, about 20 s on an idle 2-core box
    .venv/bin/python bench/bench_oip.py --quick    # smoke run: small sizes, < 20 s, exit 0

Everything runs on 127.0.0.1. The script starts one `advserve serve` process on free ports
(advserve.testing.ServerProcess: `python -m advserve.cli serve --host 127.0.0.1 --http-port P --grpc-port Q
--log-level warning`), talks to it from this process over keep-alive connections (one per path), and
stops it at the end, also on error. Every loop is bounded in count and in time.

Paths (each timed from numpy arrays in to numpy arrays out: the client's encoding, the call, decoding):
  native-http   POST /v1/losses (/v1/advantages), advserve's binary framing, a raw httpx.Client
  oip-http      POST /v2/models/losses/infer (/v2/models/grpo/infer), Triton's binary tensor extension
                written by hand: a JSON header whose inputs carry binary_data_size, then the raw buffers,
                Inference-Header-Content-Length; binary outputs (binary_data_output), same raw httpx.Client
  client-http   advserve_client.Client, HTTP, binary framing
  triton-http   tritonclient.http.InferenceServerClient.infer (binary inputs and outputs)
  client-grpc   advserve_client.Client(transport="grpc"): advserve.v1.Advserve/ComputeLosses (ComputeAdvantages)
  triton-grpc   tritonclient.grpc.InferenceServerClient.infer: ModelInfer, raw_input_contents

Parts (full sizes; --quick shrinks them):
  1. Large: losses, preset verl (ppo_clip with dual clip, token-mean) plus kl_loss k3, with logprobs,
     old_logprobs, ref_logprobs, advantages float32 and a bool response_mask [256, 4096] (17.8 MB in,
     4.2 MB out): 31 rounds.
  2. Small: GRPO preset verl, one group of 8 sequences x T = 512 (rewards [8] float32, bool mask [8, 512],
     INT64 group ids): the per-request overhead of each path, 200 rounds, one request at a time.
In each round every path makes one call, in an order that rotates from round to round, so drift hits
every path alike. Reported: median (p50) round trip per path, the server's phases from Server-Timing
(HTTP header; gRPC trailing metadata `server-timing`, read through a client interceptor), and the
ratios OIP / native: oip-http / native-http (the same httpx client, the protocols alone),
triton-http / client-http and triton-grpc / client-grpc (each protocol with its stock client).

Correctness: every answer is compared with the in-process result (advserve.compute_losses: grad_logprobs
and loss; advserve.compute_advantages: advantages), max |diff| / max |ref| <= 1e-5. Exit status 1 for a
wrong result, a status other than 200 (or a gRPC error), or a server that logs an error; speed never
affects it. Results go to bench/results/oip.json (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import grpc

from _common import (  # noqa: E402 (bench/ on sys.path)
    Failures, compare, fmt_timing, machine, median_timing, parse_server_timing, settler, stats_ms, finish)
from advserve.testing import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "oip.json"
PATHS = ("native-http", "oip-http", "client-http", "triton-http", "client-grpc", "triton-grpc")
# (OIP path, native path, what the ratio compares)
RATIOS = (("oip-http", "native-http", "HTTP, raw httpx: OIP binary extension / native framing"),
          ("triton-http", "client-http", "HTTP, stock clients: tritonclient.http / advserve_client"),
          ("triton-grpc", "client-grpc", "gRPC, stock clients: tritonclient.grpc / advserve_client"))
OIP_DATATYPES = {"float32": "FP32", "float64": "FP64", "bool": "BOOL", "int64": "INT64", "int32": "INT32"}
NUMPY_DTYPES = {"FP32": "<f4", "FP64": "<f8", "BOOL": "?", "INT64": "<i8", "INT32": "<i4"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few rounds (smoke run, < 20 s)")
    parser.add_argument("--repeats", type=int, default=None, help="part 1 rounds (default 31; quick 3)")
    parser.add_argument("--small-repeats", type=int, default=None, help="part 2 rounds (default 200; quick 20)")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds to wait, before each part, for other processes to use < 15%% of the CPUs "
                        "(default 20; quick 0)")
    parser.add_argument("--parts", default="1,2", help="comma-separated subset of 1,2 (default: both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    return parser.parse_args(argv)


# --- helpers ----------------------------------------------------------------------------------------


class CallFailed(Exception):
    """A non-200 answer, a gRPC error or a transport error (reported as a failure by the caller)."""


# --- the six paths ----------------------------------------------------------------------------------


class Paths:
    """One client per path, each over its own keep-alive connection or channel, and the last Server-Timing
    each saw (None where the path cannot read it)."""

    def __init__(self, server: ServerProcess):
        import httpx

        from advserve_client import Client

        self.server = server
        self.last_timing: dict[str, dict[str, float] | None] = {p: None for p in PATHS}
        self.missing: dict[str, str] = {}
        self.raw = httpx.Client(base_url=server.url, timeout=120)
        self.client_http = Client(server.url, timeout=120, max_retries=0)
        self.client_grpc = Client(server.grpc_address, transport="grpc", timeout=120, max_retries=0)
        # Server-Timing of the advserve clients: an httpx response hook, a gRPC interceptor (private attributes
        # of advserve_client's transports; where they are not there the timing is reported as n/a)
        try:
            self.client_http._transport._client.event_hooks["response"].append(self._hook("client-http"))
        except AttributeError:
            pass
        try:
            from advserve_client._pb import advserve_pb2_grpc

            transport = self.client_grpc._transport
            transport._stub = advserve_pb2_grpc.AdvserveStub(
                grpc.intercept_channel(transport._channel, TrailingTiming(self, "client-grpc")))
        except (AttributeError, ImportError):
            pass
        self.triton_http = self.triton_grpc = None
        try:
            import tritonclient.http as httpclient

            self.httpclient = httpclient
            self.triton_http = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", network_timeout=120,
                                                                connection_timeout=120)
            post = self.triton_http._post

            def recording_post(*args, **kwargs):
                response = post(*args, **kwargs)
                try:
                    self.last_timing["triton-http"] = parse_server_timing(response.get("Server-Timing"))
                except AttributeError:
                    pass
                return response

            self.triton_http._post = recording_post
        except ImportError as exc:
            self.missing["triton-http"] = f"tritonclient.http not importable ({exc}); pip install 'tritonclient[http]'"
        try:
            import tritonclient.grpc as grpcclient
            from tritonclient.grpc import service_pb2_grpc

            self.grpcclient = grpcclient
            self.triton_grpc = grpcclient.InferenceServerClient(server.grpc_address)
            try:
                self.triton_grpc._client_stub = service_pb2_grpc.GRPCInferenceServiceStub(
                    grpc.intercept_channel(self.triton_grpc._channel, TrailingTiming(self, "triton-grpc")))
            except AttributeError:
                pass
        except ImportError as exc:
            self.missing["triton-grpc"] = (f"tritonclient.grpc not importable ({exc}); "
                                           "pip install tritonclient grpcio packaging")

    def _hook(self, path: str) -> Callable[[Any], None]:
        def hook(response) -> None:
            self.last_timing[path] = parse_server_timing(response.headers.get("server-timing"))
        return hook

    def available(self) -> list[str]:
        return [p for p in PATHS if p not in self.missing]

    def close(self) -> None:
        for client in (self.raw, self.client_http, self.client_grpc, self.triton_http, self.triton_grpc):
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass


class TrailingTiming(grpc.UnaryUnaryClientInterceptor):
    """Reads the `server-timing` trailing metadata of every unary call into paths.last_timing[path]."""

    def __init__(self, paths: "Paths", path: str):
        self.paths, self.path = paths, path

    def intercept_unary_unary(self, continuation, client_call_details, request):
        outcome = continuation(client_call_details, request)
        try:
            trailing = outcome.trailing_metadata() or ()
        except Exception:  # noqa: BLE001 - a failed call: the caller sees its error
            trailing = ()
        for key, value in trailing:
            if key == "server-timing":
                self.paths.last_timing[self.path] = parse_server_timing(
                    value.decode() if isinstance(value, bytes) else value)
        return outcome


# --- one request, six ways ----------------------------------------------------------------------------


def native_http(paths: Paths, endpoint: str, document: dict[str, Any], arrays: dict[str, Any]):
    """advserve's binary framing over the raw httpx client: (document, {name: numpy array})."""
    from advserve_client import framing
    from advserve_client.framing import RawTensor

    n, chunks = framing.encode(document, {k: RawTensor.from_numpy(v) for k, v in arrays.items()})
    response = paths.raw.post(endpoint, content=b"".join(chunks),
                              headers={"content-type": framing.CONTENT_TYPE, framing.HEADER_LENGTH: str(n)})
    if response.status_code != 200:
        raise CallFailed(f"HTTP {response.status_code}: {response.text[:300]}")
    paths.last_timing["native-http"] = parse_server_timing(response.headers.get("server-timing"))
    doc, raw = framing.decode(response.content, response.headers.get(framing.HEADER_LENGTH))
    return doc, {k: v.to_numpy() if hasattr(v, "to_numpy") else v for k, v in raw.items()}


def oip_http(paths: Paths, model: str, parameters: dict[str, Any], arrays: dict[str, Any]):
    """Triton's binary tensor extension written by hand over the raw httpx client:
    (response parameters, {output name: numpy array})."""
    import numpy as np

    inputs = [{"name": k, "datatype": OIP_DATATYPES[str(a.dtype)], "shape": list(a.shape),
               "parameters": {"binary_data_size": a.nbytes}} for k, a in arrays.items()]
    header = json.dumps({"parameters": {**parameters, "binary_data_output": True}, "inputs": inputs}).encode()
    body = b"".join([header, *(np.ascontiguousarray(a).data for a in arrays.values())])
    response = paths.raw.post(f"/v2/models/{model}/infer", content=body,
                              headers={"content-type": "application/octet-stream",
                                       "inference-header-content-length": str(len(header))})
    if response.status_code != 200:
        raise CallFailed(f"HTTP {response.status_code}: {response.text[:300]}")
    paths.last_timing["oip-http"] = parse_server_timing(response.headers.get("server-timing"))
    content = response.content
    length = int(response.headers["inference-header-content-length"])
    answer = json.loads(content[:length])
    out, offset = {}, length
    for output in answer["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            out[output["name"]] = np.asarray(output["data"]).reshape(output["shape"])
            continue
        out[output["name"]] = np.frombuffer(content, dtype=NUMPY_DTYPES[output["datatype"]], count=size // np.dtype(
            NUMPY_DTYPES[output["datatype"]]).itemsize, offset=offset).reshape(output["shape"])
        offset += size
    if offset != len(content):
        raise CallFailed(f"oip-http: the binary outputs end at byte {offset} of {len(content)}")
    return answer.get("parameters", {}), out


def triton_call(paths: Paths, which: str, model: str, parameters: dict[str, Any], arrays: dict[str, Any]):
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    module, client = ((paths.httpclient, paths.triton_http) if which == "triton-http"
                      else (paths.grpcclient, paths.triton_grpc))
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)  # binary: HTTP's binary extension, gRPC's raw_input_contents
        inputs.append(tensor)
    try:
        result = client.infer(model, inputs, parameters=parameters)
    except InferenceServerException as exc:
        raise CallFailed(f"{which}: {exc}") from None
    names = [o["name"] for o in result.get_response()["outputs"]] if which == "triton-http" else [
        o.name for o in result.get_response().outputs]
    return {name: result.as_numpy(name) for name in names}


# --- the two requests -----------------------------------------------------------------------------------


def losses_case(rng, batch: int, length: int) -> dict[str, Any]:
    import numpy as np

    import advserve

    lengths = rng.integers(max(1, length // 8), length + 1, batch)
    mask = np.arange(length)[None, :] < lengths[:, None]
    old = (-3 * rng.random((batch, length))).astype(np.float32)
    arrays = {"logprobs": (old + 0.2 * rng.standard_normal((batch, length))).astype(np.float32),
              "old_logprobs": old,
              "ref_logprobs": (old + 0.2 * rng.standard_normal((batch, length))).astype(np.float32),
              "advantages": rng.standard_normal((batch, length)).astype(np.float32),
              "response_mask": mask}
    ref = advserve.compute_losses(preset="verl", kl_loss={"estimator": "k3"}, **arrays)
    return {"name": "losses", "label": f"losses verl + kl k3 [{batch}, {length}]", "size": [batch, length],
            "arrays": arrays, "endpoint": "/v1/losses", "document": {"preset": "verl", "kl_loss": {"estimator": "k3"}},
            "model": "losses", "parameters": {"preset": "verl", "kl_loss.estimator": "k3"},
            "output": "grad_logprobs", "ref": np.asarray(ref.grad_logprobs), "ref_loss": float(ref.loss),
            "bytes_in": sum(a.nbytes for a in arrays.values()), "bytes_out": batch * length * 4}


def grpo_case(rng, group: int, length: int) -> dict[str, Any]:
    import numpy as np

    import advserve

    lengths = rng.integers(max(1, length // 8), length + 1, group)
    arrays = {"rewards": rng.integers(0, 2, group).astype(np.float32),
              "response_mask": np.arange(length)[None, :] < lengths[:, None],
              "group_ids": np.zeros(group, dtype=np.int64)}
    arrays["rewards"][:2] = [0.0, 1.0]  # a group with signal
    ref = advserve.compute_advantages("grpo", preset="verl", **arrays)
    return {"name": "grpo", "label": f"grpo verl, {group} x {length}", "size": [group, length], "arrays": arrays,
            "endpoint": "/v1/advantages", "document": {"estimator": "grpo", "preset": "verl"},
            "model": "grpo", "parameters": {"preset": "verl"}, "output": "advantages",
            "ref": np.asarray(ref.advantages), "ref_loss": None,
            "bytes_in": sum(a.nbytes for a in arrays.values()), "bytes_out": 2 * group * length * 4}


def call(paths: Paths, path: str, case: dict[str, Any]) -> tuple[Any, float | None]:
    """One round trip of `case` over `path`: (the output array, the loss where the path returns it)."""
    arrays, output = case["arrays"], case["output"]
    if path == "native-http":
        doc, out = native_http(paths, case["endpoint"], case["document"], arrays)
        return out[output], doc.get("loss")
    if path == "oip-http":
        params, out = oip_http(paths, case["model"], case["parameters"], arrays)
        return out[output], (float(out["loss"][0]) if "loss" in out else None)
    if path in ("client-http", "client-grpc"):
        client = paths.client_http if path == "client-http" else paths.client_grpc
        from advserve_client.errors import AdvserveError

        try:
            if case["name"] == "losses":
                result = client.compute_losses(**case["document"], **arrays)
                return result.grad_logprobs, result.loss
            result = client.compute_advantages(case["document"]["estimator"], preset=case["document"]["preset"],
                                               **arrays)
            return result.advantages, None
        except AdvserveError as exc:
            raise CallFailed(f"{path}: {type(exc).__name__}: {exc}") from None
    out = triton_call(paths, path, case["model"], case["parameters"], arrays)
    return out[output], (float(out["loss"][0]) if "loss" in out else None)


def check(failures: Failures, where: str, case: dict[str, Any], got, loss) -> bool:
    result = compare(case["output"], got, case["ref"])
    ok = result["ok"]
    if not ok:
        failures.add(f"{where}: {case['output']}: {result.get('error') or 'rel %.2e' % result['rel']}")
    if case["ref_loss"] is not None:
        if loss is None:
            failures.add(f"{where}: no loss in the answer")
            return False
        loss_check = compare("loss", loss, case["ref_loss"])
        if not loss_check["ok"]:
            failures.add(f"{where}: loss {loss!r} != {case['ref_loss']!r}")
            ok = False
    return ok


def run_case(paths: Paths, case: dict[str, Any], rounds: int, warmup: int, failures: Failures,
             time_budget_s: float, part: str) -> dict[str, Any]:
    available = paths.available()
    times: dict[str, list[float]] = {p: [] for p in available}
    timings: dict[str, list[dict[str, float]]] = {p: [] for p in available}
    checked = {p: 0 for p in available}
    broken: set[str] = set()

    def one(path: str, timed: bool) -> None:
        paths.last_timing[path] = None
        t0 = time.perf_counter()
        try:
            got, loss = call(paths, path, case)
        except CallFailed as exc:
            failures.add(f"[{part}] {path}: {exc}")
            broken.add(path)
            return
        except Exception as exc:  # noqa: BLE001 - a transport error is a failure, reported with its type
            failures.add(f"[{part}] {path}: {type(exc).__name__}: {exc}")
            broken.add(path)
            return
        elapsed = (time.perf_counter() - t0) * 1e3
        if not check(failures, f"[{part}] {path}", case, got, loss):
            broken.add(path)
            return
        checked[path] += 1
        if timed:
            times[path].append(elapsed)
            if paths.last_timing[path]:
                timings[path].append(paths.last_timing[path])

    for _ in range(warmup):
        for path in available:
            if path not in broken:
                one(path, False)
    deadline = time.monotonic() + time_budget_s
    done = 0
    for i in range(rounds):
        if time.monotonic() > deadline:
            print(f"  (time budget reached after {i} rounds)", flush=True)
            break
        shift = i % len(available)
        for path in available[shift:] + available[:shift]:
            if path not in broken:
                one(path, True)
        done += 1
    rows = {}
    for path in available:
        rows[path] = {"round_trip_ms": stats_ms(times[path]), "server_timing_ms": median_timing(timings[path]),
                      "server_timing_readable": bool(timings[path]), "checked": checked[path]}
    ratios = {}
    for oip, native, what in RATIOS:
        a, b = rows.get(oip, {}).get("round_trip_ms", {}), rows.get(native, {}).get("round_trip_ms", {})
        if a.get("n") and b.get("n"):
            ratios[f"{oip}/{native}"] = {"what": what, "ratio": a["p50"] / b["p50"]}
    return {"case": case["label"], "size": case["size"], "bytes_in": case["bytes_in"], "bytes_out": case["bytes_out"],
            "rounds": done, "paths": rows, "ratios": ratios, "skipped": dict(paths.missing)}


def print_case(result: dict[str, Any]) -> None:
    print(f"  {'path':<12} {'p50 ms':>9} {'min ms':>9} {'p95 ms':>9} {'checked':>8}  Server-Timing p50")
    for path, row in result["paths"].items():
        rt = row["round_trip_ms"]
        if not rt.get("n"):
            print(f"  {path:<12} {'-':>9} {'-':>9} {'-':>9} {row['checked']:>8}  (no successful timed call)")
            continue
        print(f"  {path:<12} {rt['p50']:>9.2f} {rt['min']:>9.2f} {rt['p95']:>9.2f} {row['checked']:>8}  "
              f"{fmt_timing(row['server_timing_ms'])}")
    for path, why in result["skipped"].items():
        print(f"  {path:<12} skipped: {why}")
    for key, r in result["ratios"].items():
        print(f"  {key:<26} {r['ratio']:6.2f}x  ({r['what']})")


def print_summary(results: dict[str, Any]) -> None:
    print("\nsummary (p50 round trip, arrays in to arrays out; ratio OIP / native)")
    print("-" * 100)
    for part in ("large", "small"):
        result = results.get(part)
        if not result:
            continue
        p = result["paths"]

        def ms(path: str) -> str:
            rt = p.get(path, {}).get("round_trip_ms", {})
            return f"{rt['p50']:.2f}" if rt.get("n") else "n/a"

        for oip, native, what in RATIOS:
            ratio = result["ratios"].get(f"{oip}/{native}")
            print(f"{result['case']:<34} {oip:>11} {ms(oip):>8} ms / {native:<11} {ms(native):>8} ms = "
                  f"{'n/a' if ratio is None else format(ratio['ratio'], '.2f') + 'x'}")


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"1", "2"}:
        print(f"--parts: expected a subset of 1,2, got {args.parts!r}", file=sys.stderr)
        return 2
    cfg = {"large_size": (64, 1024) if quick else (256, 4096), "small_size": (8, 512),
           "repeats": args.repeats or (3 if quick else 31), "small_repeats": args.small_repeats or (20 if quick else 200),
           "warmup": {"large": 1 if quick else 2, "small": 2 if quick else 10},
           "max_wait_s": args.max_wait if args.max_wait is not None else (0.0 if quick else 20.0),
           "budgets_s": {"large": 10 if quick else 150, "small": 5 if quick else 60}}
    import numpy as np

    info = machine("httpx", "uvicorn", "fastapi", "grpcio", "protobuf", "tritonclient", "geventhttpclient")
    print(f"machine: {info['cpu_model']}, nproc {info['nproc']}, {info['mem_total_mib']} MiB RAM, "
          f"python {info['python']}, torch {info['torch']} ({info['torch_num_threads']} threads)")
    print(f"software: advserve {info['advserve']}, fastapi {info['fastapi']}, uvicorn {info['uvicorn']}, "
          f"httpx {info['httpx']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
          f"tritonclient {info['tritonclient']} (geventhttpclient {info['geventhttpclient']})")
    print(f"mode: {'quick' if quick else 'full'}; seed {args.seed}; one advserve server on 127.0.0.1, "
          "clients in this process, one keep-alive connection / channel per path", flush=True)

    rng = np.random.default_rng(args.seed)
    failures = Failures()
    loads: dict[str, Any] = {}
    settle = settler(loads, cfg["max_wait_s"], once=quick)

    server = ServerProcess(name="oip-bench")
    results: dict[str, Any] = {"machine": info, "mode": "quick" if quick else "full", "parts": sorted(parts),
                               "config": cfg}
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    paths = None
    try:
        server.start()
        paths = Paths(server)
        for path, why in paths.missing.items():
            print(f"  {path} skipped: {why}")
        if "1" in parts:
            case = losses_case(rng, *cfg["large_size"])
            settle("large")
            print(f"\n[1] large: {case['label']}: {case['bytes_in'] / 1e6:.1f} MB in (logprobs, old_logprobs, "
                  f"ref_logprobs, advantages float32 + bool mask), {case['bytes_out'] / 1e6:.1f} MB out "
                  f"(grad_logprobs); p50 of {cfg['repeats']} rounds", flush=True)
            results["large"] = run_case(paths, case, cfg["repeats"], cfg["warmup"]["large"], failures,
                                        cfg["budgets_s"]["large"], "1")
            print_case(results["large"])
        if "2" in parts:
            case = grpo_case(rng, *cfg["small_size"])
            settle("small")
            print(f"\n[2] small: {case['label']} (one group, INT64 ids, bool mask), one request at a time; "
                  f"p50 of {cfg['small_repeats']} rounds", flush=True)
            results["small"] = run_case(paths, case, cfg["small_repeats"], cfg["warmup"]["small"], failures,
                                        cfg["budgets_s"]["small"], "2")
            print_case(results["small"])
        if not server.alive():
            failures.add(f"the advserve server died:\n{server.log_tail()}")
    finally:
        if paths is not None:
            paths.close()
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    print_summary(results)
    commands = {"bench": shlex.join([".venv/bin/python", "bench/bench_oip.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
                "server": server.command_line()}
    return finish([server], failures, loads, commands, results, args.out, started,
                  "every answer matched the in-process result; every status 200")


if __name__ == "__main__":
    sys.exit(main())
