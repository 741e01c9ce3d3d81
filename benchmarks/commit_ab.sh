#!/usr/bin/env bash
# A B of two commits on one GPU host: this checkout ("new") against another commit's tree ("old", a `git archive`
# tarball carried in the bundle), fresh stacks alternating old, new, old, new, ... Each side is swept by its own
# tree's benchmarks.stack_variants and its stubs import vlm_triton from its own tree (the .pth file that
# benchmarks/gpu_setup.sh writes is pointed at the side that runs, and back at this checkout at the end).
#
#   git archive REV src model_repository openai_frontend benchmarks pyproject.toml | xz > .bundle/tree-REV.tar.xz
#   bash benchmarks/gpu_setup.sh .bundle
#   bash benchmarks/commit_ab.sh .bundle/tree-REV.tar.xz OUT ROUNDS "NEW_VARIANTS" -- STACK_VARIANTS_ARGS...
#
# NEW_VARIANTS: extra --variant arguments for the new side (e.g. "--variant b4095:engine.max_num_tokens=4095"),
# run after the plain "new" stack in each round; "" for none. STACK_VARIANTS_ARGS go to both sides (use options
# both trees know, e.g. an explicit --client-procs N; paths among them must be absolute: each side runs in its own
# tree). Writes OUT/{old,new}-ROUND/variants.json and OUT/ab.log, prints every load point's line, and exits non-zero
# when a side failed (after running the others). PYTHON picks the interpreter, as in gpu_setup.sh.
set -euo pipefail
if [ $# -lt 5 ] || [ "$5" != "--" ]; then
  echo "usage: $0 TREE.tar.xz OUT ROUNDS NEW_VARIANTS -- STACK_VARIANTS_ARGS..." >&2
  exit 2
fi
TAR=$(realpath "$1"); ROUNDS=$3; NEW_VARIANTS=$4
mkdir -p "$2" && OUT=$(cd "$2" && pwd)
shift 5
PY=${PYTHON:-python3}
NEW=$PWD
OLD=/tmp/ab-tree-$(basename "$TAR" .tar.xz)
rm -rf "$OLD" && mkdir -p "$OLD" && tar -xJf "$TAR" -C "$OLD"
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
point_tree() { printf '%s\n%s\n' "$1/src" "$1" > "$SITE/vlm_triton_checkout.pth"; }
trap 'point_tree "$NEW"' EXIT
failed=0
for round in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    if [ "$side" = old ]; then tree=$OLD; variants="--variant old"; else tree=$NEW; variants="--variant new $NEW_VARIANTS"; fi
    point_tree "$tree"
    # shellcheck disable=SC2086  # the variant list splits into arguments
    set +e
    (cd "$tree" && "$PY" -m benchmarks.stack_variants --out "$OUT/$side-$round" --work /tmp/ab-work $variants "$@") \
      2>&1 | tee -a "$OUT/ab.log" | { grep -E "\] stack [0-9]+ \(| errors " || true; }
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ]; then
      failed=1
      echo "$side round $round: stack_variants exited $status" | tee -a "$OUT/ab.log"
    fi
  done
done
exit "$failed"
