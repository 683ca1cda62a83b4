#!/usr/bin/env bash
# Writes constraints.txt: every package of the tested environment pinned (`==`), so that each cluster
# node installs exactly what the tests ran with (cluster.yaml: `pip install -c ~/lbgen/constraints.txt
# ~/lbgen`) and a spot replacement gets the same versions as the nodes it joins.
#
#   scripts/make_constraints.sh              # from the repository root, after the tests pass in .venv
#   PYTHON=/path/to/python scripts/make_constraints.sh
#
# Refuses an environment that cannot match the cluster's image: its Python and Ray versions must be
# those of `docker.image` in cluster.yaml (rayproject/ray:<ray>-py<XY>-gpu), since Ray refuses a
# cluster whose versions differ from the submitting one's.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

image=$(sed -n 's/^ *image: *//p' cluster.yaml)
image_ray=$(sed -E 's/.*:([0-9.]+)-py.*/\1/' <<<"$image")
image_py=$(sed -E 's/.*-py([0-9]+)-.*/\1/' <<<"$image")
env_ray=$("$python" -c 'import ray; print(ray.__version__)')
env_py=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$env_ray" != "$image_ray" || "${env_py/./}" != "$image_py" ]]; then
  echo "$python has Ray $env_ray on Python $env_py; cluster.yaml's image $image has Ray $image_ray on" \
       "py$image_py: make them agree first" >&2
  exit 1
fi

# --all keeps setuptools (lbgen needs setuptools<81, and the image may ship a newer one); pip itself is
# the installer, not a dependency; lbgen is the package being installed.
pins=$("$python" -m pip freeze --all --exclude-editable --exclude pip --exclude lbgen)
if grep -v '==' <<<"$pins"; then
  echo "the lines above are not pinned with == (a local or VCS install?): install them from the index" >&2
  exit 1
fi

{
  echo "# Pins of the environment lbgen's tests pass in (Python $env_py, ray==$env_ray, the Ray of"
  echo "# cluster.yaml's image $image). A constraints file: it installs nothing by itself,"
  echo "# it fixes the version of whatever lbgen's dependencies pull in:"
  echo "#   pip install -c constraints.txt ~/lbgen"
  echo "# Regenerate from the repository root, after the tests pass in .venv: scripts/make_constraints.sh"
  echo "$pins"
} >constraints.txt
echo "constraints.txt: $(wc -l <<<"$pins") pins, ray==$env_ray, Python $env_py"
