#!/usr/bin/env bash
# Rehearses the GPU run here, on the CPU, in an environment built like the GPU machine's image: its Python
# (3.12) and torch (2.11.0, the CUDA build from PyPI, whose kernels go unused here), the packages that image
# is known to hold and nothing of this project's own lock, then the carried wheels of .whl/ installed by
# benchmarks/gpu_run.sh itself, which runs every section of the check in --smoke mode. What it catches:
# an API missing from that torch, a package the bundle forgot, a wheel that does not install on that Python.
#
#     bash benchmarks/gpu_bundle.sh              # the cp312 wheels, if .whl/ is not filled yet
#     bash benchmarks/gpu_rehearse.sh            # builds /tmp/gpu_rehearse once (2-3 min), runs the check
#
# Options: --python PATH (default: python3.12 on PATH), --torch VERSION (default 2.11.0), --venv DIR.
# Exits 0 when every section ran and none failed; 1 otherwise; 2 on bad arguments or a missing input.
set -euo pipefail
cd "$(dirname "$0")/.."

python=python3.12
torch_version=2.11.0
venv=/tmp/gpu_rehearse
die() { echo "gpu_rehearse.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --python) python=${2:?--python needs a path}; shift 2 ;;
        --torch) torch_version=${2:?--torch needs a version, e.g. 2.11.0}; shift 2 ;;
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (valid: --python PATH, --torch VERSION, --venv DIR)" ;;
    esac
done
[[ $torch_version =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]] || die "--torch wants a version such as 2.11.0, got '$torch_version'"
py=$("$python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null) \
    || die "'$python' does not run: pass --python PATH to a Python 3.12 (the GPU machine's)"
shopt -s nullglob
compiled=(.whl/*-cp"$py"-*.whl)
((${#compiled[@]} > 0)) || die "no cp$py wheels in .whl/: run 'bash benchmarks/gpu_bundle.sh --python-version ${py:0:1}.${py:1}'"

# The image's own packages that the check or the bundle's wheels import (KINDS.md lists them; versions
# where a session read them there). typing-extensions and zipp deliberately old: the bundle must shadow them.
image=("torch==$torch_version" numpy safetensors==0.8.0 huggingface-hub==1.33.0 pyyaml fsspec tensorboard tqdm
       einops filelock requests regex pillow packaging psutil py-cpuinfo msgpack ninja nvidia-ml-py scipy jinja2
       sympy networkx setuptools typing-extensions==4.12.2 zipp==3.19.2)
marker="$venv/.image-$torch_version-cp$py"
if [[ ! -f $marker ]]; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "${image[@]}" || die "installing the image's packages into $venv failed"
    touch "$marker"
fi

out=$(mktemp -d)
# Its own torch extensions folder: another torch's build folder can hold a lock this one waits on forever.
status=0
env -u DS_ACCELERATOR PATH="$venv/bin:$PATH" OUT="$out" TORCH_EXTENSIONS_DIR="$venv/torch_extensions" \
    bash benchmarks/gpu_run.sh --smoke || status=$?
[[ -f $out/gpu_check.json ]] || { echo "gpu_rehearse.sh: gpu_run.sh (exit $status) wrote no $out/gpu_check.json" >&2; exit 1; }
"$venv/bin/python" - "$out/gpu_check.json" "$status" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
skipped = [name for name, rows in result["sections"].items() if isinstance(rows, dict) and "skipped" in rows]
env = result["environment"]
print(f"rehearsal: python {env['python']}, torch {env['torch']}: {len(result['section_seconds'])} sections in "
      f"{sum(result['section_seconds'].values()):.0f} s, failed {result['failed'] or 'none'}, "
      f"skipped {skipped or 'none'}, gpu_run.sh exit {sys.argv[2]}")
sys.exit(1 if result["failed"] or skipped or sys.argv[2] != "0" else 0)
EOF
