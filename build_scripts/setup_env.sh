#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine (root or sudo for apt): the system libraries the Triton
# Python backend and perf_analyzer need, a virtual environment with the project installed. A second run with an
# unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

"$PYTHON" - <<'PY' || { echo "error: Python >= 3.10 is required (found $($PYTHON --version 2>&1))" >&2; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

# The Python-backend stub embeds the interpreter: it needs libpython as a shared library.
libdir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
ldlib=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LDLIBRARY"))')
pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
need_apt=()
[ -e "$libdir/libpython$pyver.so.1.0" ] || [ -e "$libdir/$ldlib" -a "${ldlib%.a}" != "$ldlib" -o -e "$libdir/$ldlib" ] || need_apt+=("libpython$pyver")
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=("python$pyver-venv")
# perf_analyzer (tritonclient's binary) links libb64.
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || need_apt+=("libb64-0d")
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing system packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

stamp="$VENV/.vlm-triton-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
echo "installing the project into $VENV (first run: a few minutes)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test,onnx]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import vlm_triton, torch, transformers, tritonclient.grpc" \
  || { echo "error: the install did not complete; see pip's output above" >&2; exit 2; }
echo "$want" > "$stamp"
