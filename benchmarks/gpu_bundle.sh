#!/usr/bin/env bash
# Fills .whl/ with the wheels that benchmarks/gpu_check.py needs and a bare GPU machine lacks (it has
# torch, numpy, safetensors, huggingface-hub, pyyaml, ... but no network): run here, where PyPI is
# reachable; on the GPU machine, benchmarks/gpu_run.sh installs them and runs the check.
#
#     bash benchmarks/gpu_bundle.sh                      # cp312 wheels, for the GPU machine's Python 3.12
#     bash benchmarks/gpu_bundle.sh --python-version 3.11  # cp311, to test the bundle in a bare venv here
#
# Versions are those of cluster/image/requirements.lock. What travels, and why:
# - omegaconf (dydit_dist.config). It vendors its ANTLR runtime: no antlr4-python3-runtime.
# - diffusers (the baseline DiT and the VAE), and importlib-metadata with its zipp and lazy-importer.
# - deepspeed (the train_step section): sdist only on PyPI, so built here as a pure-Python wheel
#   (DS_BUILD_OPS=0: no compiled op; on the GPU its ops would JIT-build, and the project uses torch's
#   AdamW). It needs hjson and pydantic 2, which needs pydantic-core (compiled, per Python version),
#   annotated-types, typing-inspection and typing-extensions >= 4.16.
# - braceexpand (the shard reader, which the train_job section's Trainer uses; fsspec and tensorboard are
#   on the GPU machine).
# - typing-extensions and zipp are on the GPU machine at versions not known here, so they travel too:
#   installed first on PYTHONPATH, they shadow the older ones.
# Every other requirement of these wheels (numpy, filelock, requests, regex, safetensors >= 0.8,
# huggingface-hub >= 1.32, pillow, pyyaml, packaging, psutil, py-cpuinfo, msgpack, ninja, einops,
# tqdm) is on the GPU machine; the closure check at the end lists them.
#
# Env: BUILD_PYTHON (default .venv/bin/python) builds DeepSpeed and must import torch and setuptools.
set -euo pipefail
cd "$(dirname "$0")/.."

python_version=3.12
while [[ $# -gt 0 ]]; do
    case $1 in
        --python-version) python_version=${2:?--python-version needs a value, e.g. 3.12}; shift 2 ;;
        --python-version=*) python_version=${1#*=}; shift ;;
        -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "gpu_bundle.sh: unknown argument '$1' (valid: --python-version X.Y)" >&2; exit 2 ;;
    esac
done
[[ $python_version =~ ^3\.[0-9]+$ ]] || { echo "gpu_bundle.sh: --python-version wants X.Y, got '$python_version'" >&2; exit 2; }

build_python=${BUILD_PYTHON:-.venv/bin/python}
lock=cluster/image/requirements.lock
max_mib=40
wheels=(omegaconf diffusers importlib-metadata zipp lazy-importer hjson pydantic pydantic-core annotated-types
        typing-inspection typing-extensions braceexpand)

die() { echo "gpu_bundle.sh: $*" >&2; exit 1; }

pin() {  # NAME==VERSION from the lock
    local line
    line=$(grep -i -m1 "^$1==" "$lock") || die "$1 is not pinned in $lock"
    echo "$line"
}

"$build_python" -c "import torch, setuptools" 2>/dev/null \
    || die "BUILD_PYTHON=$build_python cannot import torch and setuptools (run 'make install' first)"

rm -rf .whl
mkdir .whl
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"

# 1. Binary wheels for the target Python on manylinux x86-64.
pins=()
for name in "${wheels[@]}"; do pins+=("$(pin "$name")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}" \
    || die "pip download failed for cp${python_version/./} (see above)"

# 2. DeepSpeed from its sdist, without ops, for the CUDA accelerator (recorded in the wheel's build info).
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$build_python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
    -w "$build" "$(pin deepspeed)" >"$build/log" 2>&1 || { cat "$build/log" >&2; die "building the DeepSpeed wheel failed"; }
ds=("$build"/deepspeed-*-py3-none-any.whl)
[[ -f ${ds[0]} ]] || die "the DeepSpeed build gave no py3-none-any wheel: $(ls "$build")"
if unzip -Z1 "${ds[0]}" | grep -qE '\.(so|pyd)$'; then die "the DeepSpeed wheel holds a compiled op"; fi
mv "${ds[0]}" .whl/

# 3. Closure: each requirement met inside the bundle, or named as expected on the GPU machine.
"$build_python" - "$python_version" .whl/*.whl <<'EOF' || die "the bundle's own requirements do not agree (above)"
import email, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

env = {"python_version": sys.argv[1], "python_full_version": sys.argv[1] + ".0", "extra": ""}
bundle = {canonicalize_name(n): v for n, v, *_ in map(parse_wheel_filename, (p.split("/")[-1] for p in sys.argv[2:]))}
outside, bad = {}, []
for path in sys.argv[2:]:
    with zipfile.ZipFile(path) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    for req in map(Requirement, meta.get_all("Requires-Dist") or []):
        if req.marker and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in bundle:
            if not req.specifier.contains(bundle[name], prereleases=True):
                bad.append(f"{meta['Name']} needs {req}, the bundle has {bundle[name]}")
        else:
            outside.setdefault(name, set()).add(str(req.specifier) or "any")
print("expected on the GPU machine:", ", ".join(f"{n} {' '.join(sorted(s))}" for n, s in sorted(outside.items())))
if bad:
    sys.exit("\n".join(bad))
EOF

stat -c '%s %n' .whl/*.whl | awk -v py="$python_version" -v max="$max_mib" '
    { total += $1; printf "%8.2f MiB  %s\n", $1 / 2^20, substr($2, 6) }
    END { printf "%8.2f MiB  total, %d wheels, for Python %s\n", total / 2^20, NR, py; exit total > max * 2^20 }' \
    || die "the bundle is over $max_mib MiB: it travels with the working tree (64 MiB a call)"
