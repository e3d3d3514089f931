# Flower's SuperLink, SuperNode and SuperExec images (flwr/superlink, flwr/supernode,
# flwr/superexec 1.41.0) rebuilt locally, for sites that cannot pull from Docker Hub:
# flwr==1.41.0 in a virtual environment at /python/venv, user "app" (uid 49999, as in the
# official images), working directory /app, and the same entrypoints. One target each:
#
#   docker build -f deploy/flower.Dockerfile --target superlink -t copra-fl/superlink:1.41.0 .
#   (likewise supernode, superexec; deploy/build.sh builds all three and the app image)
#
# BASE_IMAGE is any Debian/Ubuntu image with python3 and python3-venv (3.11 for the
# wheelhouse that deploy/wheelhouse.sh makes), e.g. the one deploy/base-image.sh imports.
# flwr comes from the wheelhouse in deploy/wheelhouse (no network needed) or, with
# INSTALL_FROM=index, from the package index that pip is configured with.
ARG BASE_IMAGE=copra-fl/debian-python:bookworm

FROM ${BASE_IMAGE} AS venv
ARG INSTALL_FROM=wheelhouse
# The wheels stay in this build stage: the images below copy only the installed venv.
COPY deploy/wheelhouse /wheelhouse
RUN case "${INSTALL_FROM}" in \
      wheelhouse) source="--no-index --find-links /wheelhouse" ;; \
      index) source="" ;; \
      *) echo "INSTALL_FROM must be 'wheelhouse' or 'index', not '${INSTALL_FROM}'" >&2; exit 2 ;; \
    esac \
    && python3 -m venv /python/venv \
    && /python/venv/bin/python -m pip install --no-cache-dir $source "flwr==1.41.0"

FROM ${BASE_IMAGE} AS flower
COPY --from=venv /python/venv /python/venv
# /app/state exists and belongs to "app" so that a named volume mounted there (the
# SuperLink's database) starts out writable by the non-root user.
RUN useradd --uid 49999 --user-group --create-home --home-dir /home/app app \
    && mkdir -p /app/state \
    && chown -R app:app /app
ENV PATH=/python/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER app

FROM flower AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flower AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flower AS superexec
ENTRYPOINT ["flower-superexec"]
