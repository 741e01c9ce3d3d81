"""`vlm-triton`: serve a checkpoint (tritonserver + OpenAI frontend), render a repository, make tiny checkpoints."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from vlm_triton.deploy.config import DeploymentConfig
from vlm_triton.errors import SetupError

DEFAULT_WORK_DIR = Path(".cache/serve")
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def _deployment(args: argparse.Namespace, work_dir: Path) -> DeploymentConfig:
    if args.deployment:
        cfg = DeploymentConfig.load(args.deployment)
    else:
        checkpoint = args.checkpoint
        if not checkpoint:
            from vlm_triton.checkpoints.tiny import make_tiny_checkpoint

            checkpoint = work_dir / "tiny-internvl3"
            if not (checkpoint / "config.json").is_file():
                print(f"no checkpoint given: generating the tiny random-weight InternVL3 model in {checkpoint}")
                make_tiny_checkpoint("internvl3", checkpoint, seed=0)
        cfg = DeploymentConfig.from_dict({"model": {"checkpoint": str(Path(checkpoint).resolve())}})
    check_checkpoint(cfg)
    media_dirs = [*cfg.limits.allowed_local_media_dirs, *(str(Path(d).resolve()) for d in args.allow_media_dir)]
    if not args.checkpoint and not args.deployment and EXAMPLES_DIR.is_dir():
        media_dirs.append(str(EXAMPLES_DIR))
    overrides: dict[str, dict] = {"limits": {"allowed_local_media_dirs": media_dirs}}
    if args.served_name:
        overrides["model"] = {"served_name": args.served_name}
    return cfg.replace(**overrides)


def check_checkpoint(cfg: DeploymentConfig) -> None:
    """Fail fast (one line) on a missing or unsupported checkpoint, before any server starts."""
    if cfg.model.profile != "torch":
        return
    from vlm_triton.checkpoints.checkpoint import Checkpoint
    from vlm_triton.families import family_class_for

    family_class_for(Checkpoint.open(cfg.model.checkpoint).config)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> None:
    from vlm_triton.deploy.render import render_repository
    from vlm_triton.server.frontend_process import start_frontend, stop_frontend
    from vlm_triton.server.triton_process import TritonPorts, TritonServer, port_is_free

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not port_is_free(args.port, "0.0.0.0"):
        raise SetupError(f"port {args.port} is in use; stop the process holding it or pass --port <free port>")
    cfg = _deployment(args, work_dir)
    repo = render_repository(cfg, work_dir / "model_repository")
    ports = TritonPorts(args.http_port, args.grpc_port, args.metrics_port)
    server = TritonServer(repo, ports=ports, log_file=work_dir / "tritonserver.log")
    print(f"starting tritonserver (HTTP {ports.http}, gRPC {ports.grpc}, metrics {ports.metrics}); log: {server.log_file}")
    frontend: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        key = ("--api-key", args.api_key) if args.api_key else ()
        frontend = start_frontend(server.grpc_url, cfg.served_name, port=args.port, host=args.host,
                                  extra_args=(*key, "--workers", str(args.frontend_workers)))
        print(f"serving {cfg.served_name!r}: OpenAI API on http://{args.host}:{args.port}/v1 (Ctrl-C stops)")
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)  # also when started from a non-interactive shell (SIG_IGN)
        while server.is_running() and frontend.poll() is None:
            time.sleep(0.5)
        if not server.is_running():
            raise SetupError(f"tritonserver stopped unexpectedly; log tail:\n{server.log_tail()}")
        raise SetupError(f"the OpenAI frontend exited with code {frontend.returncode}")
    except KeyboardInterrupt:
        print("stopping")
    finally:
        if frontend is not None:
            stop_frontend(frontend)
        server.stop()


def cmd_render(args: argparse.Namespace) -> None:
    from vlm_triton.deploy.render import render_repository

    if args.deployment:
        cfg = DeploymentConfig.load(args.deployment)
    elif args.checkpoint:
        cfg = DeploymentConfig.from_dict({"model": {"checkpoint": str(Path(args.checkpoint).resolve())}})
    else:
        raise SetupError("pass --deployment FILE or --checkpoint DIR")
    check_checkpoint(cfg)
    print(render_repository(cfg, args.out))


def cmd_tiny(args: argparse.Namespace) -> None:
    from vlm_triton.checkpoints.tiny import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.family, Path(args.out), seed=args.seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="render the repository, start tritonserver and the OpenAI frontend")
    serve.add_argument("--checkpoint", help="checkpoint folder (default: the embedded tiny InternVL3 model)")
    serve.add_argument("--deployment", help="deployment TOML file (see docs/deployment.md)")
    serve.add_argument("--served-name", help="the model id clients use (default: the checkpoint folder name)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9997, help="OpenAI API port (default: %(default)s)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--allow-media-dir", action="append", default=[], help="allow file:// URLs under DIR")
    serve.add_argument("--api-key", help="require this bearer token on /v1 routes")
    serve.add_argument("--frontend-workers", type=int, default=1,
                       help="OpenAI frontend processes sharing the port (default: %(default)s)")
    serve.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    serve.add_argument("--ready-timeout", type=float, default=600.0)
    serve.set_defaults(func=cmd_serve)
    render = sub.add_parser("render", help="write the Triton model repository for a deployment")
    render.add_argument("--deployment")
    render.add_argument("--checkpoint")
    render.add_argument("--out", default="build/model_repository")
    render.set_defaults(func=cmd_render)
    tiny = sub.add_parser("tiny", help="write a tiny random-weight checkpoint in a family's real format")
    tiny.add_argument("--family", default="internvl3")
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
