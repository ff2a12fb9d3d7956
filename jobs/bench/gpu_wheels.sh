#!/usr/bin/env bash
# Fetch, here, what `make gpu-check` needs on the lent GPU machine, as one archive
# .whl/gpu-site.tar.xz (.whl/ is ignored by git; never commit wheels). That machine has Python
# 3.12, torch 2.11 and the packages listed in DEVICE_PACKAGES below, but no Ray or MLflow, and it
# cannot download anything.
#
# Ray, MLflow and what they require (Requires-Dist followed, extras skipped, versions from
# constraints.txt where pinned) are downloaded for cp312 unless the device has them, unpacked
# into one site folder without Ray's Java jars and RLlib and MLflow's web UI (the check needs
# none), and packed with xz: about 50 MB, under the 64 MiB a call may carry (Ray's wheel alone is
# 79 MB). jobs/bench/gpu_env.sh unpacks it there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
mkdir -p "$DEST"
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
"$PY" - "$WHEELS" <<'PYEOF'
import re, subprocess, sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest = Path(sys.argv[1])
# The device's packages (device README / KINDS.md, "Python packages already there").
DEVICE_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio
attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax
e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split()
have = {canonicalize_name(n) for n in DEVICE_PACKAGES}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
platforms += ["--platform=manylinux2014_x86_64", "--platform=manylinux1_x86_64"]
# boto3 is left out: the check keeps data and checkpoints on local disk.
wanted = ["ray==2.60.0", "mlflow==3.17.2", "mlflow-skinny==3.17.2", "mlflow-tracing==3.17.2",
          "pydantic"]
constraints = ["-c", "constraints.txt"] if Path("constraints.txt").exists() else []
seen: set[str] = set()
while wanted:
    req = Requirement(wanted.pop())
    name = canonicalize_name(req.name)
    if name in seen or name in have:
        continue
    seen.add(name)
    spec = f"{req.name}{req.specifier}"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version=3.12", "--implementation=cp",
                    *platforms, *constraints, "-d", str(dest), spec], check=True)
    pattern = re.sub(r"[-_.]+", "_", name)
    wheel = max((w for w in dest.glob("*.whl")
                 if re.sub(r"[-_.]+", "_", w.name.split("-")[0].lower()) == pattern),
                key=lambda w: w.stat().st_mtime)
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                dep = Requirement(line.split(":", 1)[1].strip())
                if dep.marker is None or dep.marker.evaluate(env):
                    wanted.append(str(Requirement(dep.name)))
print("fetched:", ", ".join(sorted(seen)))
PYEOF
# One site folder (a wheel is a zip of its files and its .dist-info), trimmed, packed.
SITE="$WHEELS/site"
mkdir -p "$SITE"
for wheel in "$WHEELS"/*.whl; do unzip -q -o "$wheel" -d "$SITE"; done
rm -rf "$SITE"/ray/jars "$SITE"/ray/rllib "$SITE"/mlflow/server/js
tar -C "$SITE" -cJf "$DEST/gpu-site.tar.xz" .
du -sh "$DEST/gpu-site.tar.xz"
