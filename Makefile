# Two commands: `make demo` (the main job on the embedded testbed) and `make test` (lint + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest lint install clean bench lmms-venv test-lmms

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, from the exact release whose CPU wheel this machine holds; users with CUDA keep their own.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vtcompress bench

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# The suite on the OLDEST transformers the pyproject range admits, in its own venv (`make test` runs the newest
# release the range admits). Same torch; the package installed without resolving its pin again.
OLDEST_TRANSFORMERS ?= 5.20.0
OLD := .venv-transformers-$(OLDEST_TRANSFORMERS)
$(OLD)/.installed: pyproject.toml
	$(PY) -m venv $(OLD)
	$(OLD)/bin/python -m pip install -q --upgrade pip
	$(OLD)/bin/python -c "import torch" 2>/dev/null || $(OLD)/bin/python -m pip install -q torch==2.13.0
	$(OLD)/bin/python -m pip install -q "transformers==$(OLDEST_TRANSFORMERS)" -e ".[dev]"
	touch $@

test-oldest: $(OLD)/.installed
	$(OLD)/bin/python -c "import transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)', transformers.__version__"
	$(OLD)/bin/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/prefill.py

# ---- lmms-eval integration: begin ----------------------------------------------------------------------------
# lmms-eval 0.7.3 in its own venv (.venv-lmms) with vtcompress installed editable and the `vtcompress` model
# registered (entry point lmms_eval.models); the constraints keep the CPU torch and our transformers range.
# tests/integration/test_lmms_eval.py (collected by `make test`) runs .venv-lmms/bin/lmms-eval: build it first.
LMMS := .venv-lmms
LMMS_CONSTRAINTS := .ci/constraints-lmms.txt
$(LMMS)/.installed: pyproject.toml $(LMMS_CONSTRAINTS)
	$(PY) -m venv $(LMMS)
	$(LMMS)/bin/python -m pip install -q --upgrade pip
	$(LMMS)/bin/python -c "import torch" 2>/dev/null || $(LMMS)/bin/python -m pip install -q -c $(LMMS_CONSTRAINTS) torch==2.13.0
	$(LMMS)/bin/python -m pip install -q -c $(LMMS_CONSTRAINTS) -e ".[lmms]"
	# PyPI's torchvision (pulled by lmms-eval) is built against the CUDA torch and breaks `import transformers`
	# next to the CPU one ("operator torchvision::nms does not exist"); nothing here needs it (transformers then
	# uses its PIL image processors). A venv with a CUDA torch keeps its matching torchvision.
	$(LMMS)/bin/python -c "import torch; assert torch.version.cuda is None" 2>/dev/null && \
		$(LMMS)/bin/python -m pip uninstall -q -y torchvision || true
	$(LMMS)/bin/python -c "import transformers.pipelines, lmms_eval.models as m; assert 'vtcompress' in m.list_available_models()"
	touch $@

lmms-venv: $(LMMS)/.installed

test-lmms: $(STAMP) $(LMMS)/.installed
	$(BIN)/python -m pytest tests/integration/test_lmms_eval.py
# ---- lmms-eval integration: end ------------------------------------------------------------------------------

clean:
	rm -rf $(VENV) $(LMMS) .venv-transformers-* results .pytest_cache .ruff_cache
