# One image for the API and the worker.
#   CPU:  docker build -t influence-service .
#   GPU:  docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t influence-service:gpu .
#         (PyPI's Linux wheel of torch 2.13.0 is its CUDA 13.0 build: the host needs NVIDIA driver >= 580)
FROM python:3.11-slim AS runtime

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    IA_DATA_DIR=/data \
    IA_ARTIFACT_DIR=/data/artifacts

RUN useradd --create-home --uid 10001 influence \
 && mkdir -p /data/artifacts && chown -R influence /data

WORKDIR /srv
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Editable, so app/ stays beside alembic.ini and migrations/ in /srv, where app.db.migrate finds them.
RUN pip install -e .

USER influence
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# The API migrates the database on start; the worker service overrides this command.
CMD ["influence", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
