# Two commands on a fresh machine: `make serve` (the app) and `make test` (the suite).
# Everything runs from the project's own virtual environment, created on first use.

PYTHON ?= python3
VENV ?= .venv
# The real OIP clients (tritonclient) for the tests, in their own environment: tritonclient[grpc]
# pins protobuf<7, which Ray Serve 2.60 cannot import with (tests/clients/requirements.txt).
CLIENTS ?= .venv-clients
PY := $(VENV)/bin/python
# Ray turns token auth on for clusters it creates; this private single-user cluster on 127.0.0.1
# turns it off so `serve status` and friends work from other shells (see README, Security).
export RAY_AUTH_MODE ?= disabled
# How Serve runs (graphs/deploy.py SERVE_ENV says why; tests/test_config_check.py keeps the two
# in step): HAProxy ingress straight to the gateway replica, Ray's throughput profile (handle
# calls over gRPC), request logs written at once and shown on the console.
export RAY_SERVE_ENABLE_HA_PROXY ?= 1
export RAY_SERVE_THROUGHPUT_OPTIMIZED ?= 1
export RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE ?= 1
export RAY_SERVE_LOG_TO_STDERR ?= 1
export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S ?= 5
export RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS ?= 0.1,0.25,0.5,1,1.5,2,3,4,5,6,8,10,12,15,20,25,30,40,50,75,100,150,200,300,500,1000,2000,5000,10000,30000

.PHONY: install bootstrap serve test test-fast lint bench bench-quick gpu-bundle validate clean-registry edge k8s bench-autoscale

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The local CPU build first: the project's torch range then pulls no CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	# The rest through uv: the same versions pip resolves (checked package by package), in
	# seconds instead of the two minutes pip took here, which every CI run paid. Byte-compiled
	# as pip does: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every Ray worker would
	# otherwise compile ray, torch and mlflow from source at each start (the suite ran 1.5x slower).
	$(PY) -m pip install --quiet "uv>=0.5,<1"
	$(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) -e ".[dev]"
	touch $@

# OIP v2 gRPC stubs, compiled from the .proto with the project's grpcio-tools (build outputs).
PROTO := servecore/api/proto/inference.proto
STUBS := servecore/api/proto/inference_pb2.py servecore/api/proto/inference_pb2_grpc.py

$(STUBS) &: $(PROTO) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

install: $(VENV)/.installed $(STUBS)

$(CLIENTS)/.installed: tests/clients/requirements.txt
	test -x $(CLIENTS)/bin/python || $(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install --quiet -r tests/clients/requirements.txt
	touch $@

bootstrap: install
	$(PY) -m training.bootstrap

serve: bootstrap validate
	$(VENV)/bin/serve run serve_config.yaml

# The KubeRay manifests in cluster/k8s/, generated from the Serve configs (cluster/README.md).
k8s: install
	$(PY) -m cluster.kuberay --shipped

validate: install
	$(PY) -m servecore.config_check serve_config.yaml serve_config.gpu.yaml serve_config.onnx.yaml
	$(PY) -m servecore.config_check --registry --fit serve_config.yaml

test: install $(CLIENTS)/.installed
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not serve and not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Serving benchmark, then the offline one (Ray Data job vs a plain loop, 20,000 texts).
bench: bootstrap
	$(PY) -m bench
	$(PY) -m bench.batch

# Autoscaling policies side by side (Serve's default, servecore.autoscaling:LookAheadPolicy) on one
# bounded ramp, on a local two-node cluster; about 5 minutes (README, "Scaling that looks ahead").
bench-autoscale: install
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m cluster.elastic ramp --repeats 2 \
		--output bench/results/autoscale-latest.json

bench-quick: bootstrap
	$(PY) -m bench --quick --output /tmp/intent-bench-quick
	$(PY) -m bench.batch --quick --output /tmp/intent-bench-quick

# What travels to a lent GPU machine (no Ray, MLflow or network there; 64 MiB at most): MiniLM in
# float16 with its tokenizer and float32 reference embeddings, in .gpu-bundle/ (ignored). There:
# `python3 -m bench.gpu run --output $$OUT/gpu.json` (see bench/gpu.py and the README).
gpu-bundle: install
	$(PY) -m bench.gpu prepare --output .gpu-bundle

# Edge: export the served release to ONNX (fp32, int8, shrunk), gate each on the test split,
# register the passing ones (intent-edge, @edge on int8), then write the bundle a device runs
# (edge-bundle/) and its update channel (edge-channel/: the .tar.gz and latest.json).
edge: bootstrap
	$(PY) -m edge export
	$(PY) -m edge bundle --output edge-bundle --archive edge-channel

clean-registry:
	rm -rf mlflow.db mlartifacts .cache/models
