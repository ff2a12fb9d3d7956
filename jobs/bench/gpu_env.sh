#!/usr/bin/env bash
# On the lent GPU machine: make the wheels from jobs/bench/gpu_wheels.sh (in .whl/) importable,
# put the repository on PYTHONPATH, then run the given command. Where Ray and MLflow are already
# installed (a developer's venv) it only sets PYTHONPATH.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SITE=${GPU_SITE:-/tmp/gpu-site}
if ! python3 -c "import ray, mlflow" 2>/dev/null && [ -d "$REPO/.whl" ]; then
  mkdir -p "$SITE"
  if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$REPO"/.whl/*.whl
  fi
  [ -f "$REPO/.whl/ray-site.tar.xz" ] && tar -C "$SITE" -xJf "$REPO/.whl/ray-site.tar.xz"
  export PATH="$SITE/bin:$PATH"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
