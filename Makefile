# The two commands of the README. Both create or reuse .venv; the install re-runs only when the
# pinned requirements change (the stamp name is a hash of them).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REQ_HASH := $(shell cat pyproject.toml requirements-nodeps.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(REQ_HASH)
# onnx2tf shells out to the `onnxsim` command: the environment's bin/ must be on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install test test-fast demo doctor profile clean arm-env

install: $(STAMP)

# pip's own notices go to $(INSTALL_LOG); a failed step prints it.
INSTALL_LOG := $(VENV)/install.log
PIP := $(BIN)/python -m pip install --quiet

$(STAMP): pyproject.toml requirements-nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	@echo "installing the pinned stack into $(VENV) (about 2 minutes; log: $(INSTALL_LOG))"
	@$(PIP) --upgrade pip > $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@# Step 1: the pinned stack (torch==2.13.0 resolves to the local CPU wheel) and litert-torch.
	@$(PIP) -e '.[dev,litert]' >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@# Step 2: onnx2tf and tf-keras without their impossible pins.
	@$(PIP) --no-deps -r requirements-nodeps.txt >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@touch $@

test: install
	$(BIN)/python -m pytest -q

doctor: install
	$(BIN)/toolchain doctor

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	@# A broken environment stops here, with what to fix, not six minutes into the run.
	@$(BIN)/toolchain doctor --artifacts artifacts
	@$(BIN)/toolchain run recipes/verifier.yaml --out artifacts/demo

# aarch64 LiteRT under qemu user-mode emulation, for `toolchain parity --arch arm64` (README, ARM).
arm-env: install
	@PYTHON=$(BIN)/python bash scripts/arm-env.sh .arm-env

clean:
	rm -rf $(VENV) artifacts/demo .pytest_cache
