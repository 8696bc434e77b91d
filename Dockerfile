# The serving image: Ray's own image, this project's dependencies in a virtual environment, the
# project's packages with their gRPC stubs compiled, and `serve run serve_config.yaml` as command.
#
#   docker build -t intent-serving:2.60.0-cpu .                                  # CPU nodes
#   docker build --build-arg VARIANT=cu128 -t intent-serving:2.60.0-cu128 .      # GPU nodes
#
# RAY_VERSION must equal the ray[serve,data]== pin in pyproject.toml: the base image's Ray and the
# Ray installed below are then the same release (tests/test_container.py checks it). VARIANT is
# the flavour of Ray's image: `cpu`, or `cu128` (Ray's CUDA 12.8 build of the same release).
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
ARG BASE_IMAGE=rayproject/ray:${RAY_VERSION}-py311-${VARIANT}

# --- builder: dependencies, stubs, checked configs ---------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The build runs as Ray's user (1000:100 is the base image's ray:users); root only makes the two
# folders it fills. A virtual environment of its own (the base image's Python has Ray but none of
# the rest), at the path the final stage uses: its scripts name their interpreter by absolute path.
USER 0
RUN mkdir /opt/venv /app && chown 1000:100 /opt/venv /app
USER 1000
WORKDIR /app
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, from pyproject.toml alone, so that a code change reuses this layer. torch
# before the rest: on CPU from PyTorch's CPU index (pyproject's torch range is then satisfied and
# no CUDA wheels are pulled), on CUDA the default wheels, which carry their own CUDA libraries.
# boto3 is not a project dependency but the image needs it on AWS: the cluster launcher's
# autoscaler runs on the head node (cluster/launcher/aws.yaml), and MLflow reads s3:// artifacts.
COPY --chown=1000:100 pyproject.toml ./
RUN if [ "${VARIANT}" = "cpu" ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi \
    && python -c "import tomllib; \
        project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
        print(*project['dependencies'], sep=chr(10))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt "boto3>=1.35,<2" \
    && rm /tmp/requirements.txt

# The project's packages, the data the bootstrap trains on, and the Serve configs.
COPY --chown=1000:100 servecore/ servecore/
COPY --chown=1000:100 deployments/ deployments/
COPY --chown=1000:100 graphs/ graphs/
COPY --chown=1000:100 batch/ batch/
COPY --chown=1000:100 training/ training/
COPY --chown=1000:100 cluster/ cluster/
COPY --chown=1000:100 edge/ edge/
COPY --chown=1000:100 data/ data/
COPY --chown=1000:100 serve_config.yaml serve_config.gpu.yaml serve_config.onnx.yaml ./

# The OIP v2 gRPC stubs, compiled exactly as `make install` does. Then the configs bind every
# interface instead of 127.0.0.1 (inside a container the loopback address reaches no client; the
# host decides what is published), are checked as `make validate` checks them, and the code is
# byte-compiled here because the runtime user cannot write /app.
RUN python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
        servecore/api/proto/inference.proto \
    && sed -i 's/^  host: 127\.0\.0\.1$/  host: 0.0.0.0/' serve_config*.yaml \
    && ! grep -n 'host: 127\.0\.0\.1' serve_config*.yaml \
    && python -m servecore.config_check \
        serve_config.yaml serve_config.gpu.yaml serve_config.onnx.yaml \
    && python -m compileall -q servecore deployments graphs batch training cluster edge

# --- final: the environment and the project, nothing else --------------------------------------
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
LABEL org.opencontainers.image.title="intent-serving" \
      org.opencontainers.image.description="MLflow intent models on Ray Serve and Ray Data" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# Owned by root (COPY --from keeps the builder's owner unless told), so read-only for the runtime
# user: code and environment cannot be changed by the processes they run.
COPY --from=builder --chown=0:0 /opt/venv /opt/venv
COPY --from=builder --chown=0:0 /app /app

# The project runs from /app (PYTHONPATH: Ray's workers import the deployments from there too).
# Writable state goes under the runtime user's home: the model cache, the embedded job store and
# the prediction log (mount a volume on /home/ray/intent-serving to keep them).
#
# No secret is set here. MLFLOW_TRACKING_URI (the registry) is deliberately absent: it comes from
# the environment at run time (`docker run -e MLFLOW_TRACKING_URI=...`, the launcher's env file,
# KubeRay's ConfigMap), as do INTENT_SERVING_API_KEYS and every other INTENT_SERVING_* secret.
# Without it the registry would be an sqlite file under /app, which is not writable.
#
# How Serve runs, as the Makefile exports it (graphs/deploy.py SERVE_ENV says why; the tests keep
# the three equal): HAProxy ingress straight to the gateway replica, Ray's throughput profile,
# request logs written at once and on the console, the project's latency buckets. RAY_AUTH_MODE is
# not set: Ray's token authentication stays on for the clusters it creates.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    INTENT_SERVING_MODEL_CACHE_DIR=/home/ray/intent-serving/models \
    INTENT_SERVING_JOBS_DIR=/home/ray/intent-serving/jobs \
    INTENT_SERVING_PREDICTION_LOG_DIR=/home/ray/intent-serving/predictions \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1 \
    RAY_SERVE_LOG_TO_STDERR=1 \
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5 \
    RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS=0.1,0.25,0.5,1,1.5,2,3,4,5,6,8,10,12,15,20,25,30,40,50,75,100,150,200,300,500,1000,2000,5000,10000,30000

WORKDIR /app
# Ray's images run as `ray` (uid 1000, gid 100); so does this one. The cluster launcher runs its
# commands in interactive login shells, whose ~/.bashrc (from Ray's image) puts the base Python's
# bin first; the line added here puts the project's environment back in front, so that `ray` and
# `serve` there are this image's.
USER 1000
RUN mkdir -p /home/ray/intent-serving \
    && echo "export PATH=/opt/venv/bin:\$PATH" >> /home/ray/.bashrc

# HTTP and gRPC: HAProxy listens on both (serve_config*.yaml, bound to 0.0.0.0 above). Ray's own
# ports are not declared: the GCS (6379) and the dashboard (8265, which runs submitted code) must
# never be published by `docker run -P`; multi-node clusters use the host's network (launcher) or
# declare them per pod (KubeRay).
EXPOSE 8000 9000

# The gateway's liveness route, through HAProxy; the image has Python but maybe no curl. Start-up
# (Ray, then every replica loading its model from the registry) takes a minute or more.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", \
         "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# `serve run` shuts Serve down cleanly on SIGINT (KeyboardInterrupt), not on SIGTERM.
STOPSIGNAL SIGINT
CMD ["serve", "run", "serve_config.yaml"]
