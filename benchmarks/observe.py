"""Where the stack's time goes during a load point: CPU cores used by each process (tritonserver, each Python-backend
stub by model, the frontend) and Triton's per-model statistics (requests, queue and compute time per request).
A process near 1.0 core is bound by its GIL; a stage whose compute time per request is large is the bottleneck.

    snap = Snapshot.take(server_pid, frontend_pid, grpc_url); ...load...; report = snap.delta(Snapshot.take(...))
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def frontend_workers(pid: int) -> list[int]:
    """The worker processes of an OpenAI frontend started with `--workers` (spawned children of `pid`; not
    multiprocessing's resource tracker, also its child); [] for a frontend of one process."""
    return [c for c in _children(pid) if b"spawn_main" in _cmdline(c)]


def process_names(server_pid: int, frontend_pid: int | None) -> dict[str, int]:
    """'tritonserver', 'frontend' (its workers with --workers: 'frontend', 'frontend#2', ...) and 'stub:<model>' (the
    Python-backend stub of each model instance) -> pid."""
    names = {"tritonserver": server_pid}
    if frontend_pid:
        for i, pid in enumerate(frontend_workers(frontend_pid) or [frontend_pid]):
            names["frontend" if i == 0 else f"frontend#{i + 1}"] = pid
    for child in _children(server_pid):
        argv = _cmdline(child).split(b"\0")
        model_py = next((a.decode() for a in argv if a.endswith(b"/model.py")), None)
        if model_py:
            model = Path(model_py).parent.parent.name
            key = f"stub:{model}"
            i = 1
            while key in names:
                i += 1
                key = f"stub:{model}#{i}"
            names[key] = child
    return names


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def triton_stats(grpc_url: str) -> dict[str, dict[str, float]]:
    import tritonclient.grpc as grpcclient

    try:
        stats = grpcclient.InferenceServerClient(grpc_url).get_inference_statistics(as_json=True)
    except Exception:  # noqa: BLE001 - observation must never break a run
        return {}
    out = {}
    for m in stats.get("model_stats", []):
        s = m.get("inference_stats", {})
        get = lambda k, f: float(s.get(k, {}).get(f, 0))  # noqa: E731
        out[m["name"]] = {"count": get("success", "count"), "queue_ns": get("queue", "ns"),
                          "compute_ns": get("compute_input", "ns") + get("compute_infer", "ns")
                          + get("compute_output", "ns"), "infer_ns": get("compute_infer", "ns"),
                          # executions of the model, and batch items (a request of N tiles is N) they took
                          "executions": float(m.get("execution_count", 0)), "items": float(m.get("inference_count", 0))}
    return out


@dataclass
class Snapshot:
    t: float
    cpu: dict[str, float | None]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def take(cls, server_pid: int, frontend_pid: int | None, grpc_url: str) -> "Snapshot":
        names = process_names(server_pid, frontend_pid)
        return cls(time.perf_counter(), {n: cpu_seconds(p) for n, p in names.items()}, triton_stats(grpc_url))

    def delta(self, later: "Snapshot") -> dict[str, Any]:
        wall = later.t - self.t
        cores = {n: round((later.cpu[n] - c) / wall, 2) for n, c in self.cpu.items()
                 if c is not None and later.cpu.get(n) is not None and wall > 0}
        models = {}
        for name, s in later.stats.items():
            before = self.stats.get(name, {})
            n = s["count"] - before.get("count", 0)
            if n > 0:
                runs = s.get("executions", 0) - before.get("executions", 0)
                models[name] = {"requests": int(n),
                                "queue_ms": round((s["queue_ns"] - before.get("queue_ns", 0)) / n / 1e6, 3),
                                "compute_ms": round((s["compute_ns"] - before.get("compute_ns", 0)) / n / 1e6, 3),
                                "infer_ms": round((s.get("infer_ns", 0) - before.get("infer_ns", 0)) / n / 1e6, 3),
                                "executions": int(runs),
                                "items_per_execution": round((s.get("items", 0) - before.get("items", 0)) / runs, 2)
                                if runs > 0 else None}
        return {"wall_s": round(wall, 2), "cores": dict(sorted(cores.items(), key=lambda kv: -kv[1])),
                "models": models}


def summary_line(obs: dict[str, Any]) -> str:
    cores = ", ".join(f"{k} {v:.2f}" for k, v in list(obs["cores"].items())[:8])
    models = ", ".join(f"{k} {v['requests']}x q{v['queue_ms']:.2f}/c{v['compute_ms']:.2f} ms"
                       + (f" ({v['executions']} runs of {v['items_per_execution']} items)"
                          if v.get("items_per_execution") else "")
                       for k, v in obs["models"].items())
    return f"cores: {cores} | models: {models}"
