"""`python -m vlm_triton.trtllm`: the trtllm profile's build steps, driven by the deployment file.

  plan           print the whole build as a bash script (every command with its computed numbers)
  export-llm     write the checkpoint's LLM as a plain HF folder; print the convert_checkpoint.py command
  export-vision  export the vision encoder to ONNX (dynamic tile batch); check it with onnxruntime; print trtexec
  launch         print (or run) the mpirun + tritonserver command, one rank per LLM GPU
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import SetupError
from vlm_triton.families import ModelFamily, open_family
from vlm_triton.trtllm.plan import (
    TRTLLM_VERSION,
    EnginePlan,
    build_llm_command,
    convert_checkpoint_command,
    launch_command,
    plan_for_family,
    trtexec_command,
)


def _line(cmd: list[str]) -> str:
    return shlex.join(cmd)


def _load(args: argparse.Namespace) -> tuple[DeploymentConfig, ModelFamily, EnginePlan]:
    cfg = DeploymentConfig.load(args.deployment)
    family = open_family(cfg.model.checkpoint)
    return cfg, family, plan_for_family(cfg, family)


def build_script(cfg: DeploymentConfig, plan: EnginePlan, *, deployment: str, work_dir: str, trtllm_src: str) -> str:
    """Every step, in order, as a bash script to run inside the TensorRT-LLM container."""
    w = work_dir.rstrip("/")
    me = "python3 -m vlm_triton.trtllm"
    steps = [
        ("1. the LLM as a plain Hugging Face folder", f"{me} export-llm --deployment {deployment} --out {w}/llm_hf"),
        ("2. TensorRT-LLM checkpoint", _line(convert_checkpoint_command(
            plan, llm_dir=f"{w}/llm_hf", out_dir=f"{w}/trtllm_ckpt", trtllm_src=trtllm_src))),
        (f"3. LLM engine (max_multimodal_len = {plan.max_batch_size} x {plan.budget.max_units} x "
         f"{plan.budget.tokens_per_unit} = {plan.max_multimodal_len})",
         _line(build_llm_command(plan, checkpoint_dir=f"{w}/trtllm_ckpt", engine_dir=cfg.engine.engine_dir))),
        ("4. vision encoder to ONNX, checked against torch", f"{me} export-vision --deployment {deployment} "
         f"--out {w}/vision/vision_encoder.onnx --check"),
        ("5. vision TensorRT plan (tile batch min/opt/max = {}/{}/{})".format(*plan.vision_profile),
         '"${TRTEXEC:-trtexec}" ' + _line(trtexec_command(
             plan, onnx=f"{w}/vision/vision_encoder.onnx", plan_file=cfg.engine.vision_engine)[1:])),
        ("6. the Triton model repository", f"vlm-triton render --deployment {deployment} --out {w}/model_repository"),
        (f"7. serve ({plan.world_size} LLM rank(s))", f"{me} launch --deployment {deployment} "
         f"--repo {w}/model_repository"),
    ]
    head = [
        "#!/usr/bin/env bash",
        f"# trtllm build for {cfg.served_name}: TensorRT-LLM {TRTLLM_VERSION}.x, generated from {deployment}",
        "set -euo pipefail",
    ]
    body = [f"\n# {title}\n{command}" for title, command in steps]
    return "\n".join(head + body) + "\n"


def cmd_plan(args: argparse.Namespace) -> None:
    cfg, _, plan = _load(args)
    print(build_script(cfg, plan, deployment=args.deployment, work_dir=args.work_dir, trtllm_src=args.trtllm_src),
          end="")


def cmd_export_llm(args: argparse.Namespace) -> None:
    from vlm_triton.trtllm.llm_export import export_llm_folder

    _, family, plan = _load(args)
    out = export_llm_folder(family, args.out)
    print(f"wrote {out}; next:")
    ckpt = str(Path(args.out).with_name("trtllm_ckpt"))
    print(_line(convert_checkpoint_command(plan, llm_dir=str(out), out_dir=ckpt, trtllm_src=args.trtllm_src)))


def cmd_export_vision(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from vlm_triton.trtllm.vision_onnx import export_vision_onnx, run_onnx

    cfg, family, plan = _load(args)
    encoder = family.build_vision_encoder(torch.float32, torch.device("cpu"))
    dtypes = cfg.tensor_dtypes
    torch_dtypes = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}
    pixel, embed = torch_dtypes[dtypes["PIXEL"]], torch_dtypes[dtypes["EMBED"]]
    out = export_vision_onnx(encoder, args.out, unit_shape=plan.budget.unit_shape, max_units=plan.vision_max_batch,
                             pixel_dtype=pixel, embed_dtype=embed)
    print(f"wrote {out} (pixel_values {dtypes['PIXEL']} -> image_embeds {dtypes['EMBED']})")
    if args.check:
        x = torch.randn(min(3, plan.vision_max_batch), *plan.budget.unit_shape).to(pixel)
        with torch.no_grad():
            want = encoder(x.float())
        got = torch.from_numpy(run_onnx(out, x.numpy()).astype(np.float32))
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
        print(f"onnxruntime vs torch on {x.shape[0]} tiles: max relative error {err:.2e}")
        if err > 2e-2:
            raise SetupError(f"the ONNX export differs from torch (max relative error {err:.2e})")
    print("next: " + _line(trtexec_command(plan, onnx=str(out), plan_file=cfg.engine.vision_engine)))


def cmd_launch(args: argparse.Namespace) -> None:
    _, _, plan = _load(args)
    cmd = launch_command(plan, repo=args.repo, tritonserver=args.tritonserver)
    print(_line(cmd), file=sys.stdout if args.dry_run else sys.stderr)
    if not args.dry_run:
        os.execvp(cmd[0], cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlm_triton.trtllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: object, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--deployment", required=True, help="the deployment TOML (model.profile = 'trtllm')")
        p.set_defaults(func=func)
        return p

    p = add("plan", cmd_plan, "print every build step as a bash script")
    p.add_argument("--work-dir", default="build/trtllm", help="intermediate files (default: %(default)s)")
    p.add_argument("--trtllm-src", default="/opt/TensorRT-LLM", help=f"a TensorRT-LLM v{TRTLLM_VERSION} checkout")
    p = add("export-llm", cmd_export_llm, "write the LLM as a plain HF folder")
    p.add_argument("--out", required=True)
    p.add_argument("--trtllm-src", default="/opt/TensorRT-LLM")
    p = add("export-vision", cmd_export_vision, "export the vision encoder to ONNX")
    p.add_argument("--out", required=True)
    p.add_argument("--check", action="store_true", help="compare onnxruntime with torch on random tiles")
    p = add("launch", cmd_launch, "start tritonserver (mpirun, one rank per LLM GPU)")
    p.add_argument("--repo", required=True, help="the rendered model repository")
    p.add_argument("--tritonserver", default="/opt/tritonserver/bin/tritonserver")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
