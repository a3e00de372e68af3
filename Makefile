# moshimoshi: `make run` installs and runs the service, `make test` installs and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
MOSHI_VERSION ?= 0.2.13
# moshi 0.2.2 (what LLM-jp-Moshi-v1 and J-Moshi were saved with), for the compatibility tests
MOSHI022_VENV ?= .venv-moshi022
SILERO_VAD_VERSION ?= 6.2.3
EXTRAS := gateway,worker,asr,dev
LOCK := requirements.lock

RUN_PACKAGES := redis-server
TEST_PACKAGES := redis-server sip-tester baresip-core chromium prometheus kamailio espeak-ng fonts-ipaexfont-gothic

.PHONY: install install-test run test lint bench clean lock screenshots

install: $(STAMP)
	@ops/tools/system-packages.sh $(RUN_PACKAGES)

install-test: $(STAMP)
	@ops/tools/system-packages.sh $(TEST_PACKAGES)
	@ops/tools/install-helm.sh .tools
	@PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) ops/tools/moshi022-venv.sh $(MOSHI022_VENV)

# torch first so that the pinned build is the one every later step sees; moshi without
# its declared deps (it pins torch<2.10 but runs on 2.13): its real needs are in [worker];
# silero-vad for its ONNX weights only (it declares torch; the ASR worker runs it on onnxruntime).
# Every other version comes from the lock file ($(LOCK), written by `make lock`).
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(LOCK) "torch==$(TORCH_VERSION)"
	$(PIP) install --no-deps "moshi==$(MOSHI_VERSION)" "silero-vad==$(SILERO_VAD_VERSION)"
	$(PIP) install -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

lock:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) EXTRAS=$(EXTRAS) ops/tools/lock.sh $(LOCK)

run: install
	$(VENV)/bin/moshimoshi serve

test: install-test
	$(VENV)/bin/ruff check sip service tests ops
	$(VENV)/bin/ruff format --check sip service tests ops
	$(VENV)/bin/mypy sip service
	$(PY) -m pytest -q -rs -p no:cacheprovider --durations=25

# the README's pictures of the dashboard and the softphone, from a live demo call in Chromium
screenshots: install-test
	$(PY) ops/tools/screenshots.py

bench: install
	@for b in ops/bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(MOSHI022_VENV) .tools
