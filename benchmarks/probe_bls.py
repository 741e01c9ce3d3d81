"""Bisect a BLS -> decoupled-model hang without the project's models: a toy repository of Python models
(`gen` streams N int32 responses from a worker thread, `echo` answers once, `bls_*` call them through BLS)
served by the same tritonserver, each call with a timeout. Variants: async vs sync BLS, the callee with or
without CUDA initialised in its process, callee responses sent from execute() or from a thread.

    python -m benchmarks.probe_bls --out probe-out [--cuda] [--log-verbose]
"""

from __future__ import annotations

import argparse
import os
import platform
import textwrap
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from benchmarks.probe_stack import stream
from vlm_triton.server.triton_process import TritonPorts, TritonServer

GEN = '''
import threading, numpy as np, triton_python_backend_utils as pb_utils, json
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.threaded = params["threaded"]["string_value"] == "1"
        self.cancel = params.get("cancel", {}).get("string_value") == "1"
        self.extra = params.get("extra", {}).get("string_value") == "1"  # also send EXTRA, which BLS does not ask for
        self.gauge = None
        if params.get("metric", {}).get("string_value") == "1":
            self.family = pb_utils.MetricFamily(name="probe_active_" + args["model_name"], description="probe",
                                                kind=pb_utils.MetricFamily.GAUGE)
            self.gauge = self.family.Metric(labels={"model": args["model_name"]})
        if params["cuda"]["string_value"] == "1":
            import torch
            self.x = torch.zeros(1, device="cuda") + 1
    def _send(self, sender, n, request=None):
        for i in range(n):
            if self.cancel and request is not None and request.is_cancelled():
                return
            outs = [pb_utils.Tensor("OUT", np.array([i], dtype=np.int32))]
            if self.extra:
                outs.append(pb_utils.Tensor("EXTRA", np.array([i], dtype=np.int32)))
            sender.send(pb_utils.InferenceResponse(outs), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if i == n - 1 else 0)
    def execute(self, requests):
        for request in requests:
            n = int(pb_utils.get_input_tensor_by_name(request, "N").as_numpy().reshape(-1)[0])
            sender = request.get_response_sender()
            if self.gauge is not None:
                self.gauge.set(n)
            if self.threaded:
                threading.Thread(target=self._send, args=(sender, n, request), daemon=True).start()
            else:
                self._send(sender, n)
        return None
'''

ECHO = '''
import numpy as np, triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", pb_utils.get_input_tensor_by_name(r, "N").as_numpy().astype(np.int32))]) for r in requests]
'''

BLS = '''
import asyncio, json, numpy as np, triton_python_backend_utils as pb_utils
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.target = params["target"]["string_value"]
        self.mode = params["mode"]["string_value"]
        self.gpu_input = params.get("gpu_input", {}).get("string_value") == "1"
    def _request(self, request):
        n = pb_utils.get_input_tensor_by_name(request, "N").as_numpy()
        inputs = [pb_utils.Tensor("N", n)]
        if self.gpu_input:  # like the BLS's prompt table: a CUDA tensor as a BLS input
            import torch
            from torch.utils.dlpack import to_dlpack
            inputs.append(pb_utils.Tensor.from_dlpack("T", to_dlpack(torch.ones(512, 896, device="cuda"))))
        return pb_utils.InferenceRequest(model_name=self.target, requested_output_names=["OUT"],
                                         inputs=inputs, request_id="probe-" + str(id(n)))
    def _forward(self, sender, responses):
        got = []
        for r in responses:
            if r.has_error():
                raise RuntimeError(r.error().message())
            out = pb_utils.get_output_tensor_by_name(r, "OUT")
            if out is not None:
                got.append(int(out.as_numpy().reshape(-1)[0]))
        sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array(got or [-1], dtype=np.int32))]), flags=FINAL)
    MODE = None
'''

BLS_ASYNC = BLS + '''
    async def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            decoupled = self.target.startswith("gen")
            result = await self._request(request).async_exec(decoupled=decoupled)
            self._forward(sender, result if decoupled else [result])
        return None
'''

BLS_SYNC = BLS + '''
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            decoupled = self.target.startswith("gen")
            result = self._request(request).exec(decoupled=decoupled)
            self._forward(sender, result if decoupled else [result])
        return None
'''


def config(name: str, decoupled: bool, params: dict[str, str]) -> str:
    extra = ', { name: "EXTRA" data_type: TYPE_INT32 dims: [ -1 ] }' if params.get("extra") == "1" else ""
    plist = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in params.items())
    return textwrap.dedent(f"""\
        name: "{name}"
        backend: "python"
        max_batch_size: 0
        model_transaction_policy {{ decoupled: {str(decoupled).lower()} }}
        input [ {{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }},
                {{ name: "T" data_type: TYPE_FP32 dims: [ -1, -1 ] optional: true }} ]
        output [ {{ name: "OUT" data_type: TYPE_INT32 dims: [ -1 ] }}{extra} ]
        instance_group [ {{ count: 1 kind: KIND_CPU }} ]
        """) + plist + "\n"


def write_model(repo: Path, name: str, source: str, decoupled: bool, params: dict[str, str]) -> None:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "1" / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text(config(name, decoupled, params))


def build_repo(repo: Path, cuda: bool) -> list[str]:
    callees = {"echo": None}
    write_model(repo, "echo", ECHO, False, {})
    # (threaded, cuda, metric, cancel, extra): the last ones send an output the BLS caller did not request
    variants = [("1", "0", "1", "1", "0"), ("0", "0", "0", "0", "1"), ("1", "0", "0", "0", "1")]
    if cuda:
        variants += [("1", "1", "1", "1", "0")]
    for threaded, use_cuda, metric, cancel, extra in variants:
        name = f"gen_t{threaded}_c{use_cuda}_m{metric}_x{cancel}_e{extra}"
        write_model(repo, name, GEN, True, {"threaded": threaded, "cuda": use_cuda, "metric": metric,
                                           "cancel": cancel, "extra": extra})
        callees[name] = None
    names = []
    for callee in callees:
        for mode, source in (("async", BLS_ASYNC), ("sync", BLS_SYNC)):
            name = f"bls_{mode}_{callee}"
            write_model(repo, name, source, True, {"target": callee, "mode": mode})
            names.append(name)
            if cuda and callee.startswith("gen"):  # the W1 pattern: a CUDA input, then responses back to back
                name = f"bls_{mode}_gpuin_{callee}"
                write_model(repo, name, source, True, {"target": callee, "mode": mode, "gpu_input": "1"})
                names.append(name)
    return list(callees) + names


def call(url: str, model: str, n: int, timeout_s: float) -> str:
    inp = grpcclient.InferInput("N", [1], "INT32")
    inp.set_data_from_numpy(np.array([n], dtype=np.int32))
    return stream(url, model, [inp], timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("probe-out"))
    parser.add_argument("--cuda", action="store_true", help="also callees that initialise CUDA")
    parser.add_argument("--log-verbose", action="store_true")
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=10, help="calls per CUDA-input variant")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"python {platform.python_version()} glibc {os.confstr('CS_GNU_LIBC_VERSION')} cpus {os.cpu_count()}",
          flush=True)
    repo = Path("/tmp/probe-bls-repo")
    models = build_repo(repo, args.cuda)
    server = TritonServer(repo, ports=TritonPorts.any_free(),
                          log_file=args.out / "tritonserver-bls.log",
                          extra_args=("--log-verbose=1",) if args.log_verbose else ())
    with server:
        for model in models:
            print(f"{model}: {call(server.grpc_url, model, 3, args.timeout)}", flush=True)
        for model in [m for m in models if "_gpuin_" in m]:  # intermittent hangs: repeat, more responses
            results = [call(server.grpc_url, model, 32, args.timeout) for _ in range(args.repeat)]
            ok = sum(r.startswith("ok") for r in results)
            print(f"{model} x{args.repeat} (32 responses): {ok} ok; {[r for r in results if not r.startswith('ok')][:2]}",
                  flush=True)


if __name__ == "__main__":
    main()
