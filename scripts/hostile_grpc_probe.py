"""Hostile gRPC clients against a real `advserve serve`: the figures of issue 12's gRPC items.

    .venv/bin/python scripts/hostile_grpc_probe.py                  # every scenario, this tree
    PROBE_TREE=/tmp/h2-before .venv/bin/python scripts/hostile_grpc_probe.py unauth auth
                                                                    # the same against another checkout

Scenarios (each starts its own server on free loopback ports, --auth-token and --admission-bytes
268435456 unless stated, and stops it):

- unauth:    N concurrent S MiB ComputeLosses calls without the token (item 5);
- auth:      the same with the token (item 5);
- oip:       the authenticated burst as OIP ModelInfer calls;
- malformed: raw bytes that are not the method's message, on both services (item 9);
- port:      a second server on the first one's gRPC port (item 6);
- fuzz:      --calls corruptions of a valid request on each compute method: no INTERNAL, no traceback;
- cost:      memory per message byte while grpc receives a message and while it is decoded (the
             measurement behind transports.grpc_door.RECEIVE_COST).

Each burst prints the calls' status codes (with the advserve-error-code metadata when present), the
server's RSS before, its peak (VmHWM) and after, the burst's wall time, and what a well-behaved
client (small authenticated ComputeAdvantages calls in a loop, one at a time) saw meanwhile.
PROBE_TREE=DIR runs the server from DIR/service and DIR/client (e.g. a `git worktree` of an older
commit). Every loop is bounded in count and time; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "service"), str(ROOT / "client")]

from advserve.testing import ServerProcess, free_port  # noqa: E402
from advserve_client import framing, protocol  # noqa: E402

R = framing.RawTensor.from_numpy
TOKEN = "probe-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LOSSES = "/advserve.v1.Advserve/ComputeLosses"
INFER = "/inference.GRPCInferenceService/ModelInfer"
MIB = 1 << 20


def server_env() -> dict[str, str]:
    tree = os.environ.get("PROBE_TREE")
    if not tree:
        return {}
    return {"PYTHONPATH": f"{tree}/service:{tree}/client"}


def start(*args: str) -> ServerProcess:
    return ServerProcess("--auth-token", TOKEN, *args, env=server_env(), log_level="warning").start()


def losses_request(mib: float, seed: int = 0) -> bytes:
    """A ComputeLossesRequest of about `mib` MiB: three float32 tensors and a bool mask, T = 2048."""
    rows = max(1, int(mib * MIB / (13 * 2048)))
    rng = np.random.default_rng(seed)
    lp = -rng.random((rows, 2048), dtype=np.float32)
    tensors = {"logprobs": R(lp), "old_logprobs": R(lp), "advantages": R(rng.normal(size=(rows, 2048)).astype(np.float32)),
               "response_mask": R(np.ones((rows, 2048), bool))}
    return protocol.losses_request_to_pb({}, tensors).SerializeToString()


def infer_request(mib: float) -> bytes:
    """An OIP ModelInferRequest for the policy-loss model of about `mib` MiB (raw inputs)."""
    from advserve._oip_pb import grpc_service_pb2 as opb

    rows = max(1, int(mib * MIB / (13 * 2048)))
    rng = np.random.default_rng(0)
    lp = -rng.random((rows, 2048), dtype=np.float32)
    message = opb.ModelInferRequest(model_name="losses")
    for name, array, dtype in (("logprobs", lp, "FP32"), ("old_logprobs", lp, "FP32"),
                               ("advantages", rng.normal(size=(rows, 2048)).astype(np.float32), "FP32"),
                               ("response_mask", np.ones((rows, 2048), bool), "BOOL")):
        message.inputs.add(name=name, datatype=dtype, shape=list(array.shape))
        message.raw_input_contents.append(array.tobytes())
    return message.SerializeToString()


def small_advantages() -> bytes:
    return protocol.advantages_request_to_pb({"estimator": "grpo"}, {
        "rewards": R(np.array([1, 0, 1, 0], np.float32)), "response_mask": R(np.ones((4, 8), bool)),
        "group_ids": ["a", "a", "b", "b"]}).SerializeToString()


def outcome(exc: grpc.RpcError) -> str:
    code = dict(exc.trailing_metadata() or ()).get("advserve-error-code")
    return f"{exc.code().name}" + (f"/{code}" if code else "")


def raw_call(address: str, method: str, payload: bytes, metadata=(), timeout: float = 60.0) -> str:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", (1 << 31) - 1),
                                                 ("grpc.max_receive_message_length", (1 << 31) - 1)]) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, metadata=metadata, timeout=timeout)
            return "OK"
        except grpc.RpcError as exc:
            return outcome(exc)


class WellBehaved(threading.Thread):
    """Small authenticated ComputeAdvantages calls, one at a time, until stopped (at most 10 000)."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.address, self.stop_event = address, threading.Event()
        self.codes: Counter = Counter()
        self.latencies: list[float] = []

    def run(self) -> None:
        payload = small_advantages()
        for _ in range(10_000):
            if self.stop_event.is_set():
                return
            started = time.perf_counter()
            self.codes[raw_call(self.address, "/advserve.v1.Advserve/ComputeAdvantages", payload, AUTH, 30.0)] += 1
            self.latencies.append(time.perf_counter() - started)

    def summary(self) -> str:
        lat = np.array(self.latencies or [float("nan")])
        return (f"{dict(self.codes)} p50 {np.median(lat) * 1e3:.0f} ms max {lat.max() * 1e3:.0f} ms")


def burst(name: str, server: ServerProcess, method: str, payload: bytes, calls: int, metadata) -> None:
    time.sleep(1.0)
    before = server.status_kb("VmRSS")
    fair = WellBehaved(server.grpc_address)
    fair.start()
    time.sleep(0.5)
    codes: list[str] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda: codes.append(raw_call(server.grpc_address, method, payload, metadata)))
               for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    wall = time.perf_counter() - started
    time.sleep(0.5)
    fair.stop_event.set()
    fair.join(timeout=60)
    peak, after = server.status_kb("VmHWM"), server.status_kb("VmRSS")
    print(f"{name}: {calls} x {len(payload) / MIB:.0f} MiB -> {dict(Counter(codes))}; RSS {before / 1024:.0f} MB, "
          f"peak {peak / 1024:.0f} MB (+{(peak - before) / 1024:.0f}), after {after / 1024:.0f} MB; "
          f"{wall:.1f} s; well-behaved client meanwhile: {fair.summary()}; "
          f"log tracebacks: {server.output().count('Traceback')}", flush=True)


def scenario_unauth(args) -> None:
    server = start("--admission-bytes", str(args.admission_bytes))
    try:
        burst("unauth", server, LOSSES, losses_request(args.mib), args.calls, ())
    finally:
        server.stop()


def scenario_auth(args) -> None:
    server = start("--admission-bytes", str(args.admission_bytes))
    try:
        burst("auth", server, LOSSES, losses_request(args.mib), args.calls, AUTH)
    finally:
        server.stop()


def scenario_oip(args) -> None:
    for name, metadata in (("oip unauth", ()), ("oip auth", AUTH)):  # a fresh server each: VmHWM only grows
        server = start("--admission-bytes", str(args.admission_bytes))
        try:
            burst(name, server, INFER, infer_request(args.mib), args.calls, metadata)
        finally:
            server.stop()


def scenario_malformed(args) -> None:
    server = start()
    try:
        rng = np.random.default_rng(0)
        good = losses_request(0.01)
        payloads = [b"\xff" * 64, good[: len(good) // 2], rng.bytes(1024), b"\x0a\xff\xff\xff\xff\x0f", b"\x08"]
        for method in (LOSSES, INFER, "/advserve.v1.Advserve/ComputeAdvantages"):
            codes = Counter(raw_call(server.grpc_address, method, p, AUTH, 30.0) for p in payloads)
            print(f"malformed {method}: {dict(codes)}", flush=True)
        print(f"malformed: log tracebacks {server.output().count('Traceback')}", flush=True)
    finally:
        server.stop()


def mutations(message: bytes, count: int, seed: int = 0):
    """`count` corruptions of `message`: flipped bytes, truncations, inserted and repeated spans."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        data = bytearray(message)
        kind = rng.integers(4)
        if kind == 0:
            for index in rng.integers(0, len(data), size=rng.integers(1, 8)):
                data[index] = int(rng.integers(256))
        elif kind == 1:
            data = data[: rng.integers(0, len(data))]
        elif kind == 2:
            at = int(rng.integers(0, len(data)))
            data[at:at] = rng.bytes(int(rng.integers(1, 64)))
        else:
            at, width = int(rng.integers(0, len(data))), int(rng.integers(1, 32))
            data[at:at] = data[at:at + width] * int(rng.integers(2, 6))
        yield bytes(data)


def scenario_fuzz(args) -> None:
    """Corrupted valid requests on every compute method: no INTERNAL or UNKNOWN, no traceback."""
    from advserve._oip_pb import grpc_service_pb2 as opb

    infer = opb.ModelInferRequest(model_name="grpo")
    for name, array, dtype in (("rewards", np.array([1, 0, 1, 0], np.float32), "FP32"),
                               ("response_mask", np.ones((4, 5), bool), "BOOL")):
        infer.inputs.add(name=name, datatype=dtype, shape=list(array.shape))
        infer.raw_input_contents.append(array.tobytes())
    valid = {"/advserve.v1.Advserve/ComputeAdvantages": small_advantages(), LOSSES: losses_request(0.005),
             INFER: infer.SerializeToString()}
    server = start()
    try:
        for method, message in valid.items():
            codes = Counter(raw_call(server.grpc_address, method, data, AUTH, 30.0)
                            for data in mutations(message, args.calls))
            print(f"fuzz {method}: {args.calls} corruptions -> {dict(codes)}", flush=True)
        print(f"fuzz: log tracebacks {server.output().count('Traceback')}", flush=True)
    finally:
        server.stop()


def scenario_port(args) -> None:
    first = start()
    try:
        http = free_port()
        command = [sys.executable, "-m", "advserve.cli", "serve", "--host", "127.0.0.1", "--http-port", str(http),
                   "--grpc-port", str(first.grpc_port), "--log-level", "warning"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ADVSERVE_")}
        env.update(server_env())
        started = time.perf_counter()
        try:
            second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
            result = f"exit {second.returncode}: {(second.stderr.strip().splitlines() or [''])[-1]}"
        except subprocess.TimeoutExpired:
            result = "still running after 30 s (it shares the port)"
        print(f"port clash: second server on gRPC port {first.grpc_port}: {result} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
    finally:
        first.stop()


def scenario_cost(args) -> None:
    for part in ("receive", "decode"):
        out = subprocess.run([sys.executable, __file__, f"_cost_{part}", "--mib", str(args.mib)], capture_output=True,
                             text=True, timeout=120, env={**os.environ, **server_env()})
        print(out.stdout.strip() or out.stderr.strip()[-2000:], flush=True)


def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cost_receive(args) -> None:
    """Peak memory of a grpc.aio server while it receives one raw message (bytes per message byte)."""
    import asyncio

    port, size = free_port(), int(args.mib * MIB)  # nothing large built here: the peak is the server's
    box: dict[str, int] = {}

    async def read(messages, context):
        async for message in messages:
            box["n"] = len(message)
        return b""

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", (1 << 31) - 1)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "probe.P", {"Read": grpc.stream_unary_rpc_method_handler(read)})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        base = _rss_kb("VmHWM")
        client = subprocess.Popen([sys.executable, "-c", (
            "import grpc,sys; ch=grpc.insecure_channel(sys.argv[1],options=[('grpc.max_send_message_length',2**31-1)]);"
            "ch.unary_unary('/probe.P/Read',request_serializer=None,response_deserializer=None)"
            "(b'\\x01'*int(sys.argv[2]),timeout=60)"), f"127.0.0.1:{port}", str(size)])
        while client.poll() is None:
            await asyncio.sleep(0.05)
        print(f"cost receive: {box['n'] / MIB:.0f} MiB message, peak +{(_rss_kb('VmHWM') - base) / 1024:.0f} MB = "
              f"{(_rss_kb('VmHWM') - base) * 1024 / box['n']:.2f} bytes per message byte")
        await server.stop(None)

    asyncio.run(main())


def cost_decode(args) -> None:
    """Memory of the bytes, the parsed message and the tensors of a ComputeLossesRequest."""
    from advserve.transports.shm_tensors import resolve
    from advserve_client._pb import advserve_pb2 as pb

    raw = losses_request(args.mib)
    before = _rss_kb()
    message = pb.ComputeLossesRequest.FromString(raw)
    parsed = _rss_kb()
    _, tensors = protocol.losses_request_from_pb(message)
    views = resolve(None, tensors)
    done = _rss_kb()
    per = 1024 / len(raw)
    print(f"cost decode: {len(raw) / MIB:.0f} MiB message: bytes 1.00, parsed copy {(parsed - before) * per:.2f}, "
          f"tensors {(done - parsed) * per:.2f}: {1 + (done - before) * per:.2f} bytes per message byte "
          f"({len(views)} tensors)")


SCENARIOS = {"unauth": scenario_unauth, "auth": scenario_auth, "oip": scenario_oip, "malformed": scenario_malformed,
             "port": scenario_port, "cost": scenario_cost, "fuzz": scenario_fuzz, "_cost_receive": cost_receive, "_cost_decode": cost_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help="of: cost unauth auth oip malformed port fuzz (default: all but fuzz)")
    parser.add_argument("--mib", type=float, default=48.0, help="size of each burst message, MiB")
    parser.add_argument("--calls", type=int, default=6, help="concurrent calls in a burst")
    parser.add_argument("--admission-bytes", type=int, default=268435456)
    args = parser.parse_args()
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}")
    print(f"tree: {os.environ.get('PROBE_TREE') or ROOT}", flush=True)
    for name in args.scenarios or ["cost", "unauth", "auth", "oip", "malformed", "port"]:
        SCENARIOS[name](args)


if __name__ == "__main__":
    main()
