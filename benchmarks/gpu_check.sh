#!/usr/bin/env bash
# The real workload's GPU figures in one command: ONE JSON document on stdout, progress on stderr,
# at most 8 minutes on one GPU (an NVIDIA H200 in mind). What it measures: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh > gpu_check.json        # on a GPU machine, from any directory
#   benchmarks/gpu_check.sh --smoke > smoke.json    # the same code at a toy size on a CPU
#
# Without a GPU it fails within seconds (exit 2, one line on stderr), before Python starts.
#
# Interpreter: the repository's .venv/bin/python if there is one, else python3. The device
# machine of this workplace has no network and no .venv; its python3 holds torch, transformers,
# peft, timm, pyarrow, safetensors and pyyaml, but not diffusers, open_clip_torch (with ftfy,
# wcwidth) or pyiqa. Carry those as wheels in .whl/ (device README, "Notes": echo /.whl/ >>
# .git/info/exclude; pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl
# diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth pyiqa==0.1.16, plus whatever
# their imports then name as missing) and name .whl in the run's carry: this script installs
# them into /tmp/site. lbgen itself is imported from this checkout.
#
# NOT RUN ON A GPU YET: only --smoke and the no-GPU failure were tried (no GPU was lent).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
for arg in "$@"; do [[ $arg == --smoke ]] && smoke=true; done
if ! $smoke && ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu_check: needs an NVIDIA GPU (nvidia-smi lists none); --smoke runs the toy version on a CPU" >&2
    exit 2
fi

python=python3
[[ -x .venv/bin/python ]] && python=.venv/bin/python
if [[ -d .whl ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >&2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# 470 s: the script keeps to its own 420 s budget; this stops a hung run inside the 8 minutes.
exec timeout 470 "$python" benchmarks/gpu_check.py "$@"
