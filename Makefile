# `make train export serve` on a fresh machine: the first target creates .venv and installs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= mnist-convnet
RUN := runs/$(PRESET)
EXPORT := exports/$(PRESET)
INFERENCE_PORT ?= 8080
MANAGEMENT_PORT ?= 8081
METRICS_PORT ?= 8082
GRPC_PORTS ?= 7070 7071
BACKEND ?= onnx
RUNTIME ?= torchserve
SERVE_FLAGS ?=

.PHONY: all install train export verify serve stop status loadtest page bench test lint clean

all: train export serve

# --no-compile: byte-compiling torch's 5 GB of CUDA wheels costs a minute and buys nothing here.
# npm: onnxruntime-web, which `torchship page` vendors into every page (package-lock.json pins it).
$(STAMP): pyproject.toml serve/web/package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[dev,kserve]'
	npm ci --prefix serve/web --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/torchship train --preset $(PRESET) --out $(RUN)

export: $(STAMP)
	$(BIN)/torchship export $(RUN)/best.pt --out $(EXPORT)

verify: $(STAMP)
	$(BIN)/torchship verify $(EXPORT)

# RUNTIME=kserve serves the export itself (no archive) over the Open Inference Protocol, REST and gRPC.
serve: $(STAMP)
ifeq ($(RUNTIME),kserve)
	$(BIN)/torchship serve start --runtime kserve --model $(PRESET) --export-dir $(EXPORT) \
		--inference-port $(INFERENCE_PORT) --grpc-ports $(GRPC_PORTS) --backend $(BACKEND) $(SERVE_FLAGS)
else
	$(BIN)/torchship archive $(EXPORT) --backend $(BACKEND)
	$(BIN)/torchship serve start --model $(PRESET) --inference-port $(INFERENCE_PORT) \
		--management-port $(MANAGEMENT_PORT) --metrics-port $(METRICS_PORT) \
		--grpc-ports $(GRPC_PORTS) $(SERVE_FLAGS)
endif

stop: $(STAMP)
	$(BIN)/torchship serve stop

status: $(STAMP)
	$(BIN)/torchship serve status

loadtest: $(STAMP)
	$(BIN)/torchship loadtest --out $(RUN)/loadtest

# The model page on http://127.0.0.1:8765, its "ask the server" switch relaying to `make serve`'s TorchServe.
page: $(STAMP)
	$(BIN)/torchship page $(EXPORT) --serve --server-state serve-state

bench: $(STAMP)
	$(BIN)/python -m bench.run

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	-test -x $(BIN)/torchship && $(BIN)/torchship serve stop
	rm -rf runs exports data serve-state model_store/*.mar .pytest_cache
