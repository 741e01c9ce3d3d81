#!/usr/bin/env bash
# Install the offline bundle (benchmarks/make_bundle.py) into the Python that holds torch, on a GPU host without
# network: the wheels (numpy 1.26.4 first: the Triton Python stub needs numpy < 2), tritonserver unpacked into
# site-packages in nvidia-pytriton's layout (vlm_triton.server.triton_install finds it there), and a .pth file
# that puts this checkout's src/ and root on the path (the stub runs `python3` isolated: PYTHONPATH is ignored).
# Usage (from the checkout): bash benchmarks/gpu_setup.sh [.bundle]     PYTHON=... to pick the interpreter.
# It changes that interpreter's environment (numpy 1.26.4, protobuf 4.25): use a throwaway machine or a venv.
set -euo pipefail
BUNDLE=${1:-.bundle}
PY=${PYTHON:-python3}
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
WHEELS="$BUNDLE/wheels"
if [ -f "$BUNDLE/wheels.tar.xz" ]; then  # the wheels stored uncompressed, xz over all of them (make_bundle.py)
  WHEELS=$(mktemp -d) && tar -xJf "$BUNDLE/wheels.tar.xz" -C "$WHEELS"
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "$WHEELS"/*.whl
tar -xJf "$BUNDLE/triton.tar.xz" -C "$SITE"
printf '%s\n%s\n' "$PWD/src" "$PWD" > "$SITE/vlm_triton_checkout.pth"
# perf_analyzer (benchmarks/perf_bls.py looks beside the interpreter) with libb64 in its own folder; a wrapper adds
# that folder to the library path (perf_bls adds libcudart from nvidia_pytriton.libs itself).
if [ -f "$BUNDLE/perf.tar.xz" ]; then
  PERF=/opt/vlm_perf_analyzer
  mkdir -p "$PERF" && tar -xJf "$BUNDLE/perf.tar.xz" -C "$PERF"
  BIN=$("$PY" -c "import sys, os; print(os.path.dirname(sys.executable))")
  printf '#!/bin/sh\nexport LD_LIBRARY_PATH=%s/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\nexec %s/bin/perf_analyzer "$@"\n' \
    "$PERF" "$PERF" > "$BIN/perf_analyzer" && chmod +x "$BIN/perf_analyzer"
fi
LIBDIR=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
VER=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
if [ ! -e "$LIBDIR/libpython$VER.so.1.0" ]; then
  echo "libpython$VER.so.1.0 is not in $LIBDIR; looking for it" >&2
  found=$(find / -xdev -name "libpython$VER.so.1.0" 2>/dev/null | head -1 || true)
  [ -n "$found" ] && echo "export LD_LIBRARY_PATH=$(dirname "$found")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" > /tmp/vlm_libpython.env
fi
# transformers imports scikit-learn (and with it scipy) whenever it is installed; wheels built for numpy 2 break on
# numpy 1.26, so remove them from this throwaway environment.
"$PY" -m pip uninstall -q -y scikit-learn >/dev/null 2>&1 || true
check() {
"$PY" - <<'PY'
import numpy, torch, transformers, fastapi, uvicorn, tritonclient.grpc.aio, pytriton, vlm_triton, openai_frontend
from transformers import AutoTokenizer, GenerationMixin, Qwen2ForCausalLM
from vlm_triton.families import open_family
from openai_frontend.app import create_app
from vlm_triton.server.triton_install import find_tritonserver
print("setup ok: numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      "transformers", transformers.__version__, "tritonserver", find_tritonserver().binary)
PY
}
check || { "$PY" -m pip uninstall -q -y scipy >/dev/null 2>&1 || true; check; }
