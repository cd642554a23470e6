# digitserve: train -> export -> archive -> serve. `make help` lists the targets.
# Every target installs what it needs first, so each one works on a fresh clone.

PYTHON      ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
DATA_DIR    ?=
ARTIFACTS   := artifacts
CHECKPOINT  := $(ARTIFACTS)/mnist_cnn.pt
TORCHSCRIPT := $(ARTIFACTS)/mnist_cnn.torchscript.pt
ONNX        := $(ARTIFACTS)/mnist_cnn.onnx
INT8        := $(ARTIFACTS)/mnist_cnn.int8.onnx
MODEL_STORE := model_store
MAR         := $(MODEL_STORE)/mnist.mar
# What the archive serves: the TorchScript model, or SERVE_MODEL=$(INT8) (or $(ONNX)) for ONNX Runtime.
# The choice sticks: `make archive SERVE_MODEL=...` records it in SERVE_STAMP, and a later `make serve`
# without SERVE_MODEL serves the same model (`make clean` or another SERVE_MODEL changes it).
SERVE_STAMP := $(MODEL_STORE)/.serve_model
SERVE_MODEL ?= $(or $(shell cat $(SERVE_STAMP) 2>/dev/null),$(TORCHSCRIPT))
RUN_DIR     := .run/torchserve
# `make serve ENGINE=kserve`: the same SERVE_MODEL file on KServe's Python model server (docs/engines.md).
ENGINE      ?= torchserve
KSERVE_DIR  := .run/kserve
KSERVE_PORT ?= 8085
KSERVE_GRPC_PORT ?= 8086
KSERVE_LOCK := requirements-kserve.lock
KSERVE_INSTALLED := $(VENV)/.kserve-installed
# `make fleet`: REPLICAS TorchServe replicas under supervisord behind nginx (serving/fleet/topology.py).
FLEET_DIR   := .run/fleet
REPLICAS    ?= 2
FLEET_ORIGINS    ?=
FLEET_RATE_LIMIT ?= 100
FLEET_CONFIG     ?= config.properties
# Optional: FLEET_TLS_CERT/FLEET_TLS_KEY (else a self-signed pair is made), FLEET_API_KEYS (a file of client keys).
# FLEET_TRUSTED_PROXIES: proxies (an Ingress) whose X-Forwarded-For the rate limit trusts; none by default.
FLEET_ENV   = FLEET_ORIGINS='$(FLEET_ORIGINS)' FLEET_RATE_LIMIT=$(FLEET_RATE_LIMIT) FLEET_TLS_CERT='$(FLEET_TLS_CERT)' \
              FLEET_TLS_KEY='$(FLEET_TLS_KEY)' FLEET_API_KEYS='$(FLEET_API_KEYS)' FLEET_TRUSTED_PROXIES='$(FLEET_TRUSTED_PROXIES)'
DEMO_DIR    := .run/demo
CHROMIUM    := /usr/bin/chromium
SAMPLES     := samples
INSTALLED   := $(VENV)/.installed
LOCK        := requirements.lock
PIP_TOOLS   := pip-tools==7.7.0
# No byte-compiling at install: pip would compile all ~10,000 files of torch and friends
# (20 s of CPU on a fast 2-core machine, minutes on a slow one); Python compiles what a run imports.
PIP_FLAGS   ?= --no-compile
TRAIN_ARGS  ?=
PYTEST_ARGS ?=
IMG         ?= $(SAMPLES)/digit_7.png

DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR))

.DEFAULT_GOAL := help
.PHONY: help install lock lock-kserve system java browser prometheus nginx fonts fashion fleet fleet-stop data train export archive serve serve-torchserve serve-kserve demo stop predict samples test test-fast screenshot reliability bench manifests contact-sheet clean FORCE

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  Variables: DATA_DIR=path/to/mnist (local copy; unset: download), TRAIN_ARGS='--epochs 5', IMG=file.png"

install: $(INSTALLED) $(KSERVE_INSTALLED) ## Create .venv and install exactly requirements.lock (hash-checked), then the project

# requirements.lock pins every package (pip and setuptools too) with its hashes: pip refuses a file whose
# hash differs, and nothing unpinned comes in (--no-deps). `make lock` writes it from pyproject.toml.
$(INSTALLED): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIP_FLAGS) --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet $(PIP_FLAGS) --no-deps --no-build-isolation -e .
	grep -q '^# digitserve: a plain' $(BIN)/activate || sed 's|@CONFIG@|$(CURDIR)/config.properties|' serving/server/activate.sh >> $(BIN)/activate
	touch $@

# The second engine: kserve and its own dependencies, hash-checked, never resolved against the lock
# (kserve 0.21.0 declares protobuf<7; --no-deps keeps requirements.lock's protobuf 7; docs/engines.md).
$(KSERVE_INSTALLED): $(INSTALLED) $(KSERVE_LOCK)
	$(BIN)/pip install --quiet $(PIP_FLAGS) --require-hashes --no-deps -r $(KSERVE_LOCK)
	touch $@

lock: ## Rewrite requirements.lock (every package pinned, with hashes) from pyproject.toml, with pip-tools
	$(PYTHON) -m venv .run/lock && .run/lock/bin/pip install --quiet $(PIP_TOOLS)
	.run/lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
	    --extra test --extra bench --strip-extras --output-file $(LOCK) pyproject.toml

# requirements-kserve.lock: kserve resolved by pip-compile under requirements.lock's pins, less the four
# packages whose lock versions kserve 0.21.0 refuses (docs/engines.md); then every package the lock
# already pins is dropped, so make install keeps the lock's versions (--no-deps) and adds only the rest.
KSERVE_UNPINNED := protobuf grpcio-tools psutil python-dateutil
lock-kserve: ## Rewrite requirements-kserve.lock (kserve and what it adds to requirements.lock, with hashes), with pip-tools
	$(PYTHON) -m venv .run/lock && .run/lock/bin/pip install --quiet $(PIP_TOOLS)
	grep -E '^[A-Za-z0-9]' $(LOCK) | grep -vE '^($(subst $() ,|,$(KSERVE_UNPINNED)))==' | sed 's/ .*//' > .run/lock/constraints.txt
	sed -n 's/^kserve = \["\(.*\)"\]$$/\1/p' pyproject.toml > .run/lock/kserve.in
	.run/lock/bin/pip-compile --quiet --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links \
	    --no-header --strip-extras --constraint .run/lock/constraints.txt \
	    --output-file .run/lock/kserve.txt .run/lock/kserve.in
	{ echo '# Written by `make lock-kserve`: kserve and what it needs beyond requirements.lock, pinned with hashes.'; \
	  echo '# pip-compile under the lock'"'"'s pins less $(KSERVE_UNPINNED) (kserve 0.21.0 refuses their lock versions);'; \
	  echo '# the lock'"'"'s own packages are dropped, so make install keeps them (--no-deps; docs/engines.md).'; \
	  awk 'NR == FNR { if ($$0 ~ /^[A-Za-z0-9]/) { split($$1, pin, "=="); locked[tolower(pin[1])] = 1 } next } \
	       /^[A-Za-z0-9]/ { split($$1, pin, "=="); keep = !(tolower(pin[1]) in locked) } keep' $(LOCK) .run/lock/kserve.txt; \
	} > $(KSERVE_LOCK).new && mv $(KSERVE_LOCK).new $(KSERVE_LOCK)

# $(call apt_install,PACKAGES,WHAT FOR[,RECOMMENDS FLAG, default --no-install-recommends]): one shell command that installs
# PACKAGES, waiting up to 5 minutes for another apt-get/dpkg (unattended-upgrades, a second make) to let go
# of the dpkg lock instead of failing on it; if the install fails, one line names the packages and exit 1.
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q
apt_install = echo "installing $(1) for $(2)"; \
	$(APT_GET) update && $(APT_GET) install -y $(or $(3),--no-install-recommends) $(1) \
	  || { echo "install $(1) (apt-get install $(1)) and rerun"; exit 1; }

system: java browser prometheus nginx fonts fashion ## System packages the tests need (apt-get, only what is missing)

java: ## Install Java 17 (TorchServe needs it) with apt-get when missing
	@major=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1); \
	if [ -z "$$major" ] || [ "$$major" -lt 17 ]; then \
	  $(call apt_install,openjdk-17-jre-headless,TorchServe); \
	fi

browser: ## Install Chromium (tests/test_browser.py drives it) with apt-get when missing
	@if [ ! -x $(CHROMIUM) ]; then \
	  $(call apt_install,chromium,the browser tests,--install-recommends); \
	fi

prometheus: ## Install Prometheus (the metrics tests scrape the server with it) with apt-get when missing
	@if ! command -v prometheus >/dev/null; then \
	  $(call apt_install,prometheus,the metrics tests); \
	fi

nginx: ## Install nginx (the fleet's front door; the fleet tests start it) with apt-get when missing
	@if [ ! -x /usr/sbin/nginx ]; then \
	  $(call apt_install,nginx,the fleet's front door); \
	fi

fashion: ## Install Fashion-MNIST (Debian's dataset-fashion-mnist: real non-digits the trust checks refuse) when missing
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then \
	  $(call apt_install,dataset-fashion-mnist,the non-digits nobody here made); \
	fi

fonts: ## Install the DejaVu and Liberation fonts (training/synthetic.py draws letters and typed digits) when missing
	@if [ ! -d /usr/share/fonts/truetype/dejavu ] || [ ! -d /usr/share/fonts/truetype/liberation ]; then \
	  $(call apt_install,fonts-dejavu-core fonts-dejavu-extra fonts-liberation,the generated non-digits and typed digits); \
	fi

data: $(INSTALLED) ## Check MNIST is readable (DATA_DIR) or download it into ./data
	$(BIN)/python -m training.data $(DATA_DIR)

# The one training recipe: `make train` runs it on request (replacing the checkpoint: asking make
# to train is asking for that), `make serve` only when there is no checkpoint yet. The checkpoint
# does not depend on training/*.py: a `git pull` that touches them must not retrain a good model.
define TRAIN_RECIPE
$(BIN)/python -m training.data $(DATA_DIR)
$(BIN)/mnist-train $(DATA_FLAG) --out $(CHECKPOINT) --force $(TRAIN_ARGS)
endef

train: $(INSTALLED) fonts ## Train the CNN; writes (and replaces) artifacts/mnist_cnn.pt
	$(TRAIN_RECIPE)

# File targets: `make serve` rebuilds only what is missing or older than its inputs.
$(CHECKPOINT): | $(INSTALLED) fonts
	$(TRAIN_RECIPE)

# FORCE=1: export and archive a model below the serving accuracy floor (serving/handler/artifact.py).
FORCE_FLAG := $(if $(FORCE),--force)

$(TORCHSCRIPT) $(ONNX) $(INT8) &: $(CHECKPOINT) $(wildcard export/*.py)
	$(BIN)/mnist-export $(DATA_FLAG) --checkpoint $(CHECKPOINT) --out-dir $(ARTIFACTS) --quantize $(FORCE_FLAG)

export: $(TORCHSCRIPT) $(ONNX) $(INT8) ## Export TorchScript + ONNX (+ int8 ONNX) with the parity check

# Rewritten only when SERVE_MODEL changes, so switching models rebuilds the archive. The choice
# it replaces waits in $(SERVE_STAMP).prev until the archive is built: a choice whose archive
# fails (a model below the floor, say) is taken back, so the next `make serve` serves the last
# good one instead of failing the same way.
$(SERVE_STAMP): FORCE
	@mkdir -p $(MODEL_STORE); echo '$(SERVE_MODEL)' | cmp -s - $@ || \
	  { if [ -f $@ ]; then mv $@ $@.prev; fi; echo '$(SERVE_MODEL)' > $@; }

$(MAR): $(SERVE_MODEL) $(SERVE_STAMP) $(wildcard serving/handler/*)
	@$(BIN)/python -m serving.server.archive --serialized-file $(SERVE_MODEL) --export-path $(MODEL_STORE) $(FORCE_FLAG) \
	  && rm -f $(SERVE_STAMP).prev \
	  || { if [ -f $(SERVE_STAMP).prev ]; then mv $(SERVE_STAMP).prev $(SERVE_STAMP); else rm -f $(SERVE_STAMP); fi; \
	       echo "SERVE_MODEL=$(SERVE_MODEL) not archived: the next make serve serves $$(cat $(SERVE_STAMP) 2>/dev/null || echo $(TORCHSCRIPT))"; \
	       exit 1; }

archive: $(MAR) ## Build model_store/mnist.mar (SERVE_MODEL=artifacts/mnist_cnn.int8.onnx: int8; FORCE=1: below 99% too)

$(SAMPLES)/letter_k.png: | $(INSTALLED)
	$(BIN)/python -m training.samples $(DATA_FLAG) --out $(SAMPLES)

samples: $(SAMPLES)/letter_k.png ## Write real MNIST test digits as PNG into samples/

serve: serve-$(ENGINE) ## Everything above as needed, then start TorchServe (or ENGINE=kserve) and wait until it answers

serve-torchserve: java $(MAR) $(SAMPLES)/letter_k.png
	$(BIN)/python -m serving.server start --config config.properties --run-dir $(RUN_DIR)

serve-kserve: $(KSERVE_INSTALLED) $(SERVE_MODEL) $(SAMPLES)/letter_k.png
	$(BIN)/python -m serving.kserve start --artifact $(SERVE_MODEL) --port $(KSERVE_PORT) \
	    --grpc-port $(KSERVE_GRPC_PORT) --run-dir $(KSERVE_DIR)

demo: serve ## `make serve`, then the draw-a-digit page on http://127.0.0.1:8000 (serving/web/index.html)
	$(BIN)/python -m serving.web.demo start --config config.properties --run-dir $(DEMO_DIR) \
	    $(if $(filter kserve,$(ENGINE)),--server http://127.0.0.1:$(KSERVE_PORT))

fleet: java nginx $(MAR) $(SAMPLES)/letter_k.png ## `make serve`'s build, then REPLICAS servers behind nginx on :8088 and :8443 (TLS)
	$(FLEET_ENV) $(BIN)/python -m serving.fleet start \
	    --archive $(MAR) --replicas $(REPLICAS) --config $(FLEET_CONFIG) --run-dir $(FLEET_DIR)

fleet-stop: ## Stop everything `make fleet` started (replicas, nginx, supervisord)
	$(BIN)/python -m serving.fleet stop --run-dir $(FLEET_DIR)

config.production.properties: config.properties serving/server/properties.py | $(INSTALLED) ## Derive the token-auth config from config.properties
	$(BIN)/python -m serving.server.properties production-config --base config.properties > $@

stop: ## Stop the TorchServe (or KServe) started by `make serve` and the page server of `make demo`
	$(BIN)/python -m serving.server stop --run-dir $(RUN_DIR)
	$(BIN)/python -m serving.kserve stop --run-dir $(KSERVE_DIR)
	$(BIN)/python -m serving.web.demo stop --run-dir $(DEMO_DIR)

# Where `make serve`'s server answers: config.properties' own inference_address, not a second copy.
INFERENCE_ADDRESS := $(shell sed -n 's/^inference_address=//p' config.properties)

predict: ## curl one image to the running server: make predict IMG=samples/digit_7.png
	curl -sS --fail-with-body -w '\n' -T $(IMG) $(INFERENCE_ADDRESS)/predictions/mnist

# The tests read MNIST from DATA_DIR (like every other target), else $$MNIST_DATA_DIR, else ../shared/mnist.
TEST_ENV := $(if $(DATA_DIR),MNIST_DATA_DIR=$(abspath $(DATA_DIR)))

test: $(INSTALLED) $(KSERVE_INSTALLED) system ## Run the test suite (DATA_DIR, else MNIST_DATA_DIR, else ../shared/mnist)
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(INSTALLED) ## The fast tier: no trained model, no servers (FAST_TIMES_DOC=docs/testing.md records its time)
	$(TEST_ENV) bash .ci/fast-tier

screenshot: $(INSTALLED) system ## Refresh docs/draw-a-digit.png (the browser test's picture of an answer)
	DIGITSERVE_SCREENSHOT=$(CURDIR)/docs/draw-a-digit.png $(TEST_ENV) $(BIN)/python -m pytest -q \
	    tests/test_browser.py -k screenshot

reliability: $(INSTALLED) java ## Hostile inputs, fuzzing, a 90-second load, killed workers and ranks: a table in docs/security.md
	RELIABILITY_SECONDS=30 RELIABILITY_MAX_REQUESTS=20000 RELIABILITY_DOC=$(CURDIR)/docs/security.md $(TEST_ENV) \
	    $(BIN)/python -m pytest -m reliability -s -q $(PYTEST_ARGS)

bench: $(INSTALLED) java export ## Measure training, inference and serving against baselines: benchmarks/RESULTS.md
	@command -v wrk >/dev/null || { $(call apt_install,wrk,make bench); }
	$(BIN)/python -m benchmarks.run $(DATA_FLAG)

manifests: $(INSTALLED) ## Regenerate deploy/kubernetes/*.yaml from serving/fleet/topology.py, the nginx template and benchmarks/footprint.json
	$(BIN)/python -m deploy.manifests

contact-sheet: $(INSTALLED) $(CHECKPOINT) ## docs/preprocessing.png and its table: what the model sees of photos, pens, small scans
	$(BIN)/python -m benchmarks.contact_sheet $(DATA_FLAG) --checkpoint $(CHECKPOINT)

# Servers first: their pid files live in .run/, and a server left running without them is orphaned
# (the next start fails on its ports). A stop that fails (Java outliving its timeout) stops clean too.
clean: ## Stop what make serve/demo/fleet started, then remove artifacts, archives and server state (keeps .venv and data)
	@if [ -x $(BIN)/python ]; then $(MAKE) --no-print-directory stop fleet-stop; fi
	rm -rf $(ARTIFACTS) $(MODEL_STORE) .run $(SAMPLES) logs
