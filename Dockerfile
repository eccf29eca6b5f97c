# The GPU worker image: this repository installed with CUDA torch, run as a non-root user.
#
#   docker build -t ghcr.io/visionpipe/visionpipe:latest .
#
# The Kubernetes job templates in deployments/pools/ name this image (their `image` variable),
# run Prefect's command as its arguments and mount the state volume at /state. Prefect, MLflow
# and S3 settings (PREFECT_*, MLFLOW_*, AWS_*) come from the environment: the pod's secret or
# `docker run -e`. The host needs the NVIDIA driver and container toolkit (`--gpus all`); torch's
# wheels from PyPI bring the CUDA runtime libraries themselves.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VISIONPIPE_CHECKOUT=/opt/visionpipe \
    VISIONPIPE_HOME=/state \
    PREFECT_HOME=/state/prefect \
    PREFECT_RESULTS_PERSIST_BY_DEFAULT=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_ENABLE_ASYNC_LOGGING=false \
    PYTHONPATH=/opt/visionpipe

# libgomp1: torch's OpenMP runtime; git: Prefect's git_clone pull step, if a deployment uses one.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin visionpipe \
    && mkdir -p /state /opt/visionpipe \
    && chown visionpipe:visionpipe /state

WORKDIR /opt/visionpipe
# torch first, pinned as in the Makefile: the layer survives edits of the project's code.
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[kubernetes]'
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
COPY prefect.yaml ./
RUN chmod 0755 deployments/docker/entrypoint.sh

USER visionpipe
VOLUME ["/state"]
ENTRYPOINT ["/opt/visionpipe/deployments/docker/entrypoint.sh"]
# A process worker by default; Kubernetes jobs pass Prefect's flow-run command instead.
CMD ["prefect", "worker", "start", "--pool", "gpu-host"]
