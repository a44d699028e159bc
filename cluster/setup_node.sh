#!/usr/bin/env bash
# Set up one cluster node (cluster.yaml's setup_commands run this on the head, then on every
# worker): the Python environment in ~/venv, then the ImageNet weights in the torch hub cache.
#
#   bash ~/cellseg/cluster/setup_node.sh WHEELHOUSE BACKBONE...
#
# ~/venv is reused when it was built from this pyproject.toml (a node started from an image baked
# after a first `ray up`: setup takes seconds). Otherwise it is installed from the wheelhouse
# (an s3:// prefix, filled by the first node that installs from PyPI, normally the head), so a
# new GPU node copies wheels from S3 in its region instead of resolving and downloading from PyPI.
set -euo pipefail
wheelhouse="${1:?usage: setup_node.sh WHEELHOUSE BACKBONE...}"
shift
repo="$HOME/cellseg"
python=python3.11
key="$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"  # wheels and venv belong to this file
stamp="$HOME/venv/.cellseg-pyproject"
wheels="$HOME/wheels-$key"

if [[ -x "$HOME/venv/bin/python" && "$(cat "$stamp" 2>/dev/null)" == "$key" ]]; then
  echo "setup_node: ~/venv already built from this pyproject.toml"
  "$HOME/venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo"  # the pinned commit
else
  rm -rf "$HOME/venv"
  "$python" -m venv "$HOME/venv"
  "$HOME/venv/bin/pip" install -q --upgrade pip
  mkdir -p "$wheels"
  if aws s3 sync --only-show-errors "$wheelhouse/$key" "$wheels" && compgen -G "$wheels/*.whl" >/dev/null; then
    echo "setup_node: installing from the wheelhouse $wheelhouse/$key"
    "$HOME/venv/bin/pip" install -q --no-index --find-links "$wheels" -e "$repo[cluster]"
  else
    echo "setup_node: installing from PyPI, then filling the wheelhouse $wheelhouse/$key"
    "$HOME/venv/bin/pip" install -q -e "$repo[cluster]"
    "$HOME/venv/bin/pip" wheel -q --wheel-dir "$wheels" "$repo[cluster]"  # from pip's cache
    rm -f "$wheels"/cellseg-*.whl  # the project itself is installed from the checkout
    aws s3 sync --only-show-errors "$wheels" "$wheelhouse/$key"
  fi
  echo "$key" > "$stamp"
fi

# The weights every trial may load, once per node (trials find them in ~/.cache/torch/hub).
"$HOME/venv/bin/python" - "$@" <<'PY'
import sys

from cellseg.weights import imagenet_file

for backbone in sys.argv[1:]:
    print(f"setup_node: weights {imagenet_file(backbone)}")
PY
