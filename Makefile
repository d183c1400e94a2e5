# Two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install demo test

# torch first and on its own: on a CPU machine `torch==2.13.0` is the CPU build (local wheel);
# where torch is already installed (GPU machines) it is kept as it is.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PIP) -e '.[test]'

demo: install
	$(PYTHON) -m comet demo

test: install
	$(PYTHON) -m pytest -q tests
