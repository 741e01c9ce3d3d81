"""Table, targets and plots from a results.json of `benchmarks.run`.

    python -m benchmarks.report bench-out/results.json [--plots docs/img/bench]   # plots need matplotlib
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _kv_bytes_per_token(shape: dict[str, Any]) -> int:
    llm = shape["llm"]
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    return llm["num_hidden_layers"] * 2 * llm["num_key_value_heads"] * head_dim * 2  # K and V, bf16


def roofline_ms(results: dict[str, Any], workload: str, c: int) -> float | None:
    """Decode step floor: (weights read per step + KV of c requests at the mean decode context) / copy bandwidth."""
    bw = (results.get("ceilings") or {}).get("copy_bw_Bps")
    if not bw:
        return None
    w = results["workloads"][workload]
    ctx = w["prompt_tokens"] + w["output_tokens"] / 2
    step_bytes = results["weight_bytes"]["llm_step"] + c * ctx * _kv_bytes_per_token(results["shape"])
    return step_bytes / bw * 1e3


def _f(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.0%}"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for path, runs in (("engine", (results.get("engine") or {}).get("runs", {})),
                       ("stack", (results.get("stack") or {}).get("runs", {}))):
        for wname, rs in runs.items():
            for r in rs:
                if "concurrency" not in r:
                    continue
                roof = roofline_ms(results, wname, r["concurrency"])
                tpot = r["tpot_ms"]["p50"]
                out.append({"workload": wname, "c": r["concurrency"], "path": path, "tok_s": r["output_tok_s"],
                            "req_s": r["req_s"], "ttft50": r["ttft_ms"]["p50"], "ttft99": r["ttft_ms"]["p99"],
                            "tpot50": tpot, "tpot99": r["tpot_ms"]["p99"], "itl99": r["itl_ms"]["p99"],
                            "roof": roof, "roof_frac": roof / tpot if roof and tpot else None,
                            "n": r["requests"], "errors": r.get("errors", 0)})
    for h in results.get("hf", []):
        if "error" in h:
            continue
        b = h["batch"]
        roof = roofline_ms(results, "W2", b)
        tpot = h.get("tpot_ms", h["step_ms"])
        out.append({"workload": "W2", "c": b, "path": f"HF {h['mode']} b{b}", "tok_s": h["output_tok_s"],
                    "req_s": b / h["wall_s"], "ttft50": h.get("ttft_ms"), "ttft99": None, "tpot50": tpot,
                    "tpot99": None, "itl99": None, "roof": roof, "roof_frac": roof / tpot if roof else None,
                    "n": b, "errors": 0})
    order = {"W1": 0, "W2": 1, "W3": 2}
    out.sort(key=lambda r: (order.get(r["workload"], 9), r["c"], r["path"]))
    return out


def targets(results: dict[str, Any]) -> list[str]:
    rs = rows(results)

    def get(w: str, c: int, path: str) -> dict[str, Any] | None:
        return next((r for r in rs if r["workload"] == w and r["c"] == c and r["path"] == path), None)

    lines = []
    for w in ("W1", "W2", "W3"):
        s1, s64 = get(w, 1, "stack"), get(w, 64, "stack")
        if s1:
            lines.append(f"{w} TTFT p50 at c=1 <= 40 ms: {_f(s1['ttft50'])} ms -> "
                         f"{'MET' if s1['ttft50'] and s1['ttft50'] <= 40 else 'MISSED'}")
            lines.append(f"{w} TPOT p50 at c=1 <= 2 ms: {_f(s1['tpot50'], 2)} ms -> "
                         f"{'MET' if s1['tpot50'] and s1['tpot50'] <= 2 else 'MISSED'}")
        if s64:
            lines.append(f"{w} TPOT p50 at c=64 <= 8 ms: {_f(s64['tpot50'], 2)} ms -> "
                         f"{'MET' if s64['tpot50'] and s64['tpot50'] <= 8 else 'MISSED'}")
    s64, hf = get("W2", 64, "stack"), get("W2", 64, "HF static b64")
    if s64 and hf:
        ratio = s64["tok_s"] / hf["tok_s"]
        lines.append(f"W2 c=64 output tok/s >= 0.8 x HF static-cache compiled batch 64: {_f(s64['tok_s'], 0)} vs "
                     f"{_f(hf['tok_s'], 0)} = {ratio:.2f}x -> {'MET' if ratio >= 0.8 else 'MISSED'}")
    for ns in (results.get("stack") or {}).get("non_stream_W2", []):
        st = get("W2", ns["concurrency"], "stack")
        if st and ns.get("output_tok_s"):
            ratio = st["tok_s"] / ns["output_tok_s"]
            lines.append(f"W2 c={ns['concurrency']} streaming >= 90% of non-streaming: {_f(st['tok_s'], 0)} vs "
                         f"{_f(ns['output_tok_s'], 0)} tok/s = {ratio:.0%} -> {'MET' if ratio >= 0.9 else 'MISSED'}")
    for w in ("W2", "W1", "W3"):
        for c in (1, 4, 16, 64):
            e, s = get(w, c, "engine"), get(w, c, "stack")
            if not (e and s and e["tok_s"]):
                continue
            head = f"{w} c={c} stack overhead over bare engine <= 10% (throughput): "
            if not s["tok_s"]:
                lines.append(head + f"the stack produced nothing ({s.get('errors', '?')} errors) -> MISSED")
                continue
            over = e["tok_s"] / s["tok_s"] - 1
            lines.append(head + f"{_f(s['tok_s'], 0)} vs {_f(e['tok_s'], 0)} tok/s = {over:+.0%} -> "
                         f"{'MET' if over <= 0.10 else 'MISSED'}")
    return lines


def table(results: dict[str, Any]) -> str:
    ceil = results.get("ceilings") or {}
    head = [f"## {results.get('preset')} on {ceil.get('name', ceil.get('device', '?'))} "
            f"(torch {ceil.get('torch', '?')}, CUDA {ceil.get('cuda', '?')})"]
    if ceil.get("copy_bw_Bps"):
        head.append(f"copy bandwidth {ceil['copy_bw_Bps'] / 1e12:.2f} TB/s (read+write), bf16 matmul "
                    f"{ceil['matmul_flops'] / 1e12:.0f} TFLOP/s (8192^3); LLM weights read per decode step "
                    f"{results['weight_bytes']['llm_step'] / 1e9:.2f} GB, KV "
                    f"{_kv_bytes_per_token(results['shape']) / 1024:.0f} KiB/token")
    vis = results.get("vision")
    if vis and vis.get("peak_flops_used"):
        head.append(f"vision encoder (floor = FLOPs / {vis['peak_flops_used'] / 1e12:.0f} TFLOP/s measured matmul"
                    f"; datasheet dense bf16 {(vis.get('peak_flops_datasheet') or 0) / 1e12:.0f}):")
        for r in vis["rows"]:
            head.append(f"  {r['tiles']:3d} tiles: {r['ms']:.1f} ms, {r['tflops']:.1f} TFLOP, "
                        f"{r['achieved_tflops_s']:.0f} TFLOP/s = {r.get('fraction_of_floor', 0):.0%} of floor "
                        f"({_f(r.get('floor_ms'), 1)} ms)")
    lines = head + ["",
                    "| workload | c | path | out tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p99 ms |"
                    " decode floor ms | floor / TPOT | n (err) |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows(results):
        lines.append(f"| {r['workload']} | {r['c']} | {r['path']} | {_f(r['tok_s'], 0)} | {_f(r['req_s'], 2)} | "
                     f"{_f(r['ttft50'])} / {_f(r['ttft99'])} | {_f(r['tpot50'], 2)} / {_f(r['tpot99'], 2)} | "
                     f"{_f(r['itl99'], 2)} | {_f(r['roof'], 2)} | "
                     f"{_pct(r['roof_frac'])} | {r['n']} ({r['errors']}) |")
    for ns in (results.get("stack") or {}).get("non_stream_W2", []):
        lines.append(f"| W2 | {ns['concurrency']} | stack non-streaming | {_f(ns['output_tok_s'], 0)} | "
                     f"{_f(ns['req_s'], 2)} | latency p50 {_f(ns['latency_ms']['p50'])} | | | | | "
                     f"{ns['requests']} ({ns['errors']}) |")
    perf = (results.get("stack") or {}).get("perf_analyzer_W2") or []
    if perf:
        from benchmarks.perf_bls import table as perf_table

        lines += ["", "perf_analyzer, W2 straight into the BLS (gRPC streaming, Triton-level view):", perf_table(perf)]
    lines += ["", "Targets:"] + [f"- {t}" for t in targets(results)]
    return "\n".join(lines)


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rs = [r for r in rows(results) if r["path"] in ("engine", "stack")]
    hf = [r for r in rows(results) if r["path"].startswith("HF")]
    files = []
    wls = ["W1", "W2", "W3"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, w in zip(axes, wls):
        for path, style in (("engine", "o--"), ("stack", "s-")):
            pts = sorted((r["c"], r["tok_s"]) for r in rs if r["workload"] == w and r["path"] == path)
            if pts:
                ax.plot(*zip(*pts), style, label=path)
        if w == "W2":
            for r in hf:
                ax.scatter([r["c"]], [r["tok_s"]], marker="x", label=r["path"])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{w}: output tok/s")
        ax.set_xlabel("concurrency")
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(out / "throughput.png")
    fig.savefig(files[-1], dpi=80)
    for metric, title in (("ttft", "TTFT ms"), ("tpot", "TPOT ms")):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        runs_by = {"engine": (results.get("engine") or {}).get("runs", {}),
                   "stack": (results.get("stack") or {}).get("runs", {})}
        for ax, w in zip(axes, wls):
            for path, style in (("engine", "--"), ("stack", "-")):
                pts = [r for r in runs_by[path].get(w, []) if "concurrency" in r]
                if not pts:
                    continue
                cs = [r["concurrency"] for r in pts]
                for q, marker in (("p50", "o"), ("p90", "^"), ("p99", "v")):
                    ax.plot(cs, [r[f"{metric}_ms"][q] for r in pts], marker=marker, linestyle=style,
                            label=f"{path} {q}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{w}: {title}")
            ax.set_xlabel("concurrency")
            ax.legend(fontsize=6)
        fig.tight_layout()
        files.append(out / f"{metric}.png")
        fig.savefig(files[-1], dpi=80)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--plots", type=Path)
    args = ap.parse_args()
    results = json.loads(args.results.read_text())
    print(table(results))
    if args.plots:
        for f in plots(results, args.plots):
            print("wrote", f)


if __name__ == "__main__":
    main()
