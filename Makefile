# Two commands for a newcomer: `make demo` (main job on the embedded demo data) and `make test`.
# Both create .venv, install torch from the local CPU wheel first, then this package with its
# compiled extension (no build isolation, so pip does not fetch a CUDA torch to build against).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
DEMO_DIR ?= data/lung-ct

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)

.PHONY: install demo test lint clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) -c "import due_ext, due_ext._C; [print(s) for s in due_ext.backends().values()]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m due_ext demo --out $(DEMO_DIR)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf build $(VENV) due_ext/_C*.so *.egg-info
