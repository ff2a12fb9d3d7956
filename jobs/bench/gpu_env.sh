#!/usr/bin/env bash
# On the lent GPU machine: unpack .whl/gpu-site.tar.xz (from jobs/bench/gpu_wheels.sh, carried
# with the call), put it and the repository on PYTHONPATH, then run the given command. Where Ray
# and MLflow are already installed (a developer's venv) it only sets PYTHONPATH.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SITE=${GPU_SITE:-/tmp/gpu-site}
if ! "${1:-python3}" -c "import ray, mlflow" 2>/dev/null; then
  if [ ! -f "$REPO/.whl/gpu-site.tar.xz" ]; then
    echo "error: Ray/MLflow missing and no .whl/gpu-site.tar.xz: run jobs/bench/gpu_wheels.sh" \
      "(make gpu-wheels) where pip can download, and carry .whl along" >&2
    exit 2
  fi
  mkdir -p "$SITE"
  tar -C "$SITE" -xJf "$REPO/.whl/gpu-site.tar.xz"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
