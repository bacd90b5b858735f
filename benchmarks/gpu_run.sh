#!/usr/bin/env bash
# The whole command on a bare GPU machine (no network): installs the wheels benchmarks/gpu_bundle.sh put
# in .whl/ into /tmp/site, then runs benchmarks/gpu_check.py with the machine's own python3 and torch.
#
#     bash benchmarks/gpu_run.sh [gpu_check.py arguments, e.g. --budget-s 420]
#
# Results go to $OUT when it is set (the device tool's folder that comes back), else benchmarks/results.
# Exits with gpu_check.py's status.
set -euo pipefail
cd "$(dirname "$0")/.."

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "gpu_run.sh: no wheels in $PWD/.whl: run 'bash benchmarks/gpu_bundle.sh' where PyPI is reachable," \
        "and carry .whl with the working tree" >&2
    exit 2
fi

start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
echo "installed ${#wheels[@]} wheels into /tmp/site in $((SECONDS - start)) s"

# /tmp/site first: its wheels shadow older copies on the machine (typing-extensions, zipp).
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset DS_ACCELERATOR  # DeepSpeed must pick CUDA, not the CPU the tests use

nvidia-smi -L || echo "gpu_run.sh: nvidia-smi failed" >&2
python3 - "${wheels[@]}" <<'EOF' || echo "gpu_run.sh: could not print the versions" >&2
import importlib.metadata as md, platform, sys
import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}")
for name in sorted({p.split("/")[-1].split("-")[0] for p in sys.argv[1:]}):
    try:
        dist = md.distribution(name)
        print(f"  {name} {dist.version} ({dist.locate_file('')})")
    except md.PackageNotFoundError:
        print(f"  {name}: NOT FOUND")
EOF

exec python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results}" "$@"
