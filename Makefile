# `make train export serve` and `make test` on a bare machine: system packages first, then .venv with everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= mnist-convnet
RUN := runs/$(PRESET)
EXPORT := exports/$(PRESET)
BACKEND ?= onnx
RUNTIME ?= torchserve
SERVE_FLAGS ?=
# Python keeps compiled modules beside their sources; an environment that turns that off (PYTHONDONTWRITEBYTECODE,
# set on these machines) has every process compile torch's and onnxscript's sources again: 3 of an export's 10
# CPU-seconds (docs/testing.md).
unexport PYTHONDONTWRITEBYTECODE

# What the machine itself must have, as command:package (Debian and Ubuntu names; `ubuntu:` entries replace them
# there). Serving needs Java 17 (TorchServe) and npm (the page's onnxruntime-web); the tests also drive Chromium
# through chromedriver, compile AOTInductor packages with g++ and run the curl line `serve start` prints.
SERVE_SYSTEM := python-venv:python3-venv java:openjdk-17-jre-headless npm:npm
TEST_SYSTEM := $(SERVE_SYSTEM) g++:g++ chromium:chromium chromedriver:chromium-driver curl:curl
# make bench also runs Triton's perf_analyzer (bench/triton_tools.py), which links Debian's libb64.
BENCH_SYSTEM := $(SERVE_SYSTEM) libb64:libb64-0d
UBUNTU_NAMES := chromium:chromium-browser chromedriver:chromium-chromedriver

.PHONY: all install system-serve system-test system-bench train export verify serve stop status loadtest page bench gpu-check \
	test test-fast lint clean

all: train export serve

# One line when something is installed, nothing when all is there; without root or password-less sudo, stop
# before any work with the exact command to run.
define SYSTEM_CHECK
missing=""; \
. /etc/os-release 2>/dev/null || true; \
for pair in $(1); do \
  cmd=$${pair%%:*}; pkg=$${pair#*:}; \
  if [ "$$ID" = ubuntu ]; then for u in $(UBUNTU_NAMES); do [ "$${u%%:*}" = "$$cmd" ] && pkg=$${u#*:}; done; fi; \
  case $$cmd in \
    python-venv) $(PYTHON) -c "import ensurepip, venv" >/dev/null 2>&1 && continue ;; \
    java) v=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
          [ -n "$$v" ] && [ "$$v" -ge 17 ] && continue ;; \
    chromium) { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1 && continue ;; \
    libb64) ldconfig -p 2>/dev/null | grep -q libb64.so.0d && continue ;; \
    *) command -v $$cmd >/dev/null 2>&1 && continue ;; \
  esac; \
  missing="$$missing $$pkg"; \
done; \
[ -z "$$missing" ] && exit 0; \
if ! command -v apt-get >/dev/null 2>&1; then \
  echo "torchship needs these system packages (Debian names):$$missing; install them with your package manager"; exit 1; \
elif [ "$$(id -u)" = 0 ]; then apt="apt-get"; \
elif sudo -n true 2>/dev/null; then apt="sudo apt-get"; \
else echo "missing system packages:$$missing; run: sudo apt-get install -y$$missing"; exit 1; fi; \
echo "installing system packages with $$apt:$$missing"; \
log=$$(mktemp); { $$apt update -qq && DEBIAN_FRONTEND=noninteractive $$apt install -y -qq$$missing; } >$$log 2>&1 \
  || { cat $$log; rm -f $$log; exit 1; }; rm -f $$log
endef

system-serve:
	@$(call SYSTEM_CHECK,$(SERVE_SYSTEM))

system-test:
	@$(call SYSTEM_CHECK,$(TEST_SYSTEM))

system-bench:
	@$(call SYSTEM_CHECK,$(BENCH_SYSTEM))

# --no-compile: byte-compiling torch's 5 GB of CUDA wheels costs a minute and buys nothing here.
# npm: onnxruntime-web, which `torchship page` vendors into every page (package-lock.json pins it).
$(STAMP): pyproject.toml serve/web/package-lock.json | system-serve
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	npm ci --prefix serve/web --no-audit --no-fund --ignore-scripts --loglevel=error
	$(BIN)/python -c "from torchship.serve.page import vendored; vendored()"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/torchship train --preset $(PRESET) --out $(RUN)

export: $(STAMP)
	$(BIN)/torchship export $(RUN)/best.pt --out $(EXPORT)

verify: $(STAMP)
	$(BIN)/torchship verify $(EXPORT)

# Ports and the rest are `torchship serve start`'s own defaults (--help); SERVE_FLAGS passes anything else.
# RUNTIME=kserve serves the export itself (no archive) over the Open Inference Protocol, REST and gRPC.
serve: $(STAMP) system-serve
ifeq ($(RUNTIME),torchserve)
	$(BIN)/torchship archive $(EXPORT) --backend $(BACKEND)
	$(BIN)/torchship serve start --model $(PRESET) $(SERVE_FLAGS)
else
	$(BIN)/torchship serve start --runtime $(RUNTIME) --model $(PRESET) --export-dir $(EXPORT) --backend $(BACKEND) \
		$(SERVE_FLAGS)
endif

stop: $(STAMP)
	$(BIN)/torchship serve stop

status: $(STAMP)
	$(BIN)/torchship serve status

loadtest: $(STAMP)
	$(BIN)/torchship loadtest --out $(RUN)/loadtest

# The model page on http://127.0.0.1:8765, its "ask the server" switch relaying to `make serve`'s server.
page: $(STAMP)
	$(BIN)/torchship page $(EXPORT) --serve --server-state serve-state

# Three runs by default: one run on a shared machine swings by tens of percent, so every target is stated as the
# range over the runs and how many of them met it (`BENCH_RUNS=1` for a quick look).
BENCH_RUNS ?= 3
bench: $(STAMP) system-bench
	$(BIN)/python -m bench.run --runs $(BENCH_RUNS)

# On a machine with a CUDA PyTorch and no network: `make gpu-check PYTHON=python3` runs from the checkout, no install.
gpu-check:
	$(PYTHON) -m bench.gpu

# Three workers of one thread each, a test file each at a time: much of the suite waits on server, JVM, interpreter and
# rendezvous starts, so a third worker fills the cores the other two leave idle (measured on clean clones of the
# 2-core machine, whose speed drifts by a third from hour to hour: 3 workers 7.5-11.1 min, 2 workers 8.2-10.9 min,
# 1 worker 12-13 min; workers of two threads spin against each other and gain nothing). tests/conftest.py trains
# and compiles the shared model once for all of them.
TEST_WORKERS ?= 3

# ruff first (formatting is the tool's: no `# fmt: skip` in the tree), then the suite.
test: $(STAMP) system-test lint
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

# The unit tests, by folder: no servers, no training, no compiles, no browser (seconds).
test-fast: $(STAMP)
	$(BIN)/pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	-test -x $(BIN)/torchship && $(BIN)/torchship serve stop
	rm -rf runs exports data serve-state model_store/*.mar .pytest_cache
