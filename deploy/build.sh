#!/usr/bin/env bash
# Build every image of docker-compose.yml without Docker Hub and without a package index:
# the Flower images from deploy/flower.Dockerfile and the copra-fl image on top of them, all
# from the wheels in deploy/wheelhouse (deploy/wheelhouse.sh) and a local base image
# (deploy/base-image.sh).
#
#   deploy/build.sh [BASE_IMAGE]
#
# BASE_IMAGE defaults to copra-fl/debian-python:bookworm. Afterwards, point docker-compose
# at the local images with the variables this script prints (or `source deploy/local-images.env`).
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:-copra-fl/debian-python:bookworm}"
if ! find deploy/wheelhouse -name 'torch-*.whl' | grep -q .; then
  echo "build.sh: deploy/wheelhouse has no torch wheel; fill it first: bash deploy/wheelhouse.sh" >&2
  exit 2
fi
for target in superlink supernode superexec; do
  echo "building copra-fl/$target:1.41.0 (deploy/flower.Dockerfile, base $base)" >&2
  docker build --quiet -f deploy/flower.Dockerfile --build-arg BASE_IMAGE="$base" \
    --build-arg INSTALL_FROM=wheelhouse --target "$target" -t "copra-fl/$target:1.41.0" . >/dev/null
done
set -a
# shellcheck source=local-images.env
source deploy/local-images.env
set +a
echo "building copra-fl:${COPRA_FL_VERSION:-0.1.0} (Dockerfile, base $COPRA_FL_BASE_IMAGE)" >&2
# Only one service: every ClientApp service and the ServerApp share this image.
docker-compose build serverapp
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^copra-fl' >&2
cat deploy/local-images.env
