#!/usr/bin/env bash
# A Debian base image with Python 3.11, made without a container registry:
# debootstrap from a Debian mirror, then `docker import`. For sites that cannot pull
# Docker Hub images; the Flower images (deploy/flower.Dockerfile) and the copra-fl image
# are built FROM it (BASE_IMAGE).
#
#   deploy/base-image.sh [IMAGE] [MIRROR]
#
# IMAGE defaults to copra-fl/debian-python:bookworm. MIRROR defaults to the first Debian
# mirror in this machine's apt sources (/etc/apt/sources.list and sources.list.d), so no
# host name is written here. Needs root, debootstrap and a running Docker engine.
set -euo pipefail
image="${1:-copra-fl/debian-python:bookworm}"
mirror="${2:-}"
suite=bookworm # Python 3.11, as scripts/setup.sh and the wheelhouse's cp311 wheels expect

if [ -z "$mirror" ]; then
  # deb822 ("URIs: <url>") or one-line ("deb <url> <suite> ...") entries of the Debian archive.
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ {print $2} /^deb / {print ($2 ~ /^\[/ ? $3 : $2)}' |
    grep -E '/debian/?$' | head -n 1 || true)
fi
if [ -z "$mirror" ]; then
  echo "base-image.sh: no Debian mirror in the apt sources; pass one: $0 $image <mirror-url>" >&2
  exit 2
fi
command -v debootstrap >/dev/null || {
  echo "base-image.sh: debootstrap is missing (apt-get install debootstrap)" >&2
  exit 2
}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap $suite from $mirror (a few minutes)" >&2
# minbase + python3-venv: the Flower images create their virtual environment with it.
debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$rootfs" "$mirror" >&2
# Slim the image: package lists, caches and docs are not needed at run time.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "imported $image ($(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec) from $mirror)" >&2
