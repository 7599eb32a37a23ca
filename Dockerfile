# The pipeline with CUDA PyTorch: the image of the docker-pool and kubernetes-pool deployments
# (prefect.yaml, docs/orchestration.md). Not built in CI.
#
#   docker build -t ddpm-pipeline:latest .
#   docker run --rm --gpus all ddpm-pipeline:latest python -c "import torch; print(torch.cuda.device_count())"
#
# PyPI's Linux x86_64 torch wheel is the CUDA build and carries the CUDA runtime, so a slim Python
# base is enough; the host needs the NVIDIA driver (and, for Docker, the NVIDIA Container Toolkit).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    DDPM_HOME=/ddpm \
    HOME=/tmp

# torch alone first: the largest layer, cached across code changes. Keep this pin equal to
# pyproject.toml's, or the install below replaces this layer's torch with another download.
RUN pip install torch==2.13.0

WORKDIR /opt/ddpm
COPY . /opt/ddpm
# Editable: the deployments' entrypoints (flows/*.py, relative to /opt/ddpm) and the installed
# packages are the same files. HOME=/tmp: the container may run as any uid (prefect.yaml's user).
RUN pip install -e ".[inception,dask]" && python -c "import ddpm, flows.train_pipeline"

# The worker's job command (prefect flow-run execute) replaces this; alone, the image runs the
# default pipeline.
CMD ["python", "-m", "flows.train_pipeline"]
