# Two commands for a newcomer: `make demo` (main job on the embedded demo data) and `make test`.
# Both create .venv, install torch from the local CPU wheel first, then this package with its
# compiled extension (no build isolation, so pip does not fetch a CUDA torch to build against).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MAX_JOBS ?= 2
METHOD ?= due

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)

.PHONY: install demo test deploy-test cuda-build clean

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation -e '.[test,export]'
	$(PY) -c "import due_ext, due_ext._C; [print(s) for s in due_ext.backends().values()]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m due_ext demo --method $(METHOD)

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The MONAI Deploy application's test (CI runs it after `make test`). The SDK pulls holoscan and CUDA Python
# wheels (~1.5 GB), so it lives in its own venv (kept in the cache): torch from the local CPU wheel first, then
# deploy/requirements.txt; due_ext is not installed there (the app runs the exported bundle's vendored code).
DEPLOY_VENV ?= $(HOME)/.cache/due_ext/venv-deploy

deploy-test: install
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(DEPLOY_VENV)/bin/pip install -q -r deploy/requirements.txt
	DUE_DEPLOY_PYTHON=$(DEPLOY_VENV)/bin/python $(PY) -m pytest -q tests/test_deploy_app.py

# CI proof that the CUDA kernels compile and link (no GPU runs them here): a separate venv with the CUDA
# build of torch (from local disk, ~5.5 GB, kept in the cache between runs) compiles the extension with
# FORCE_CUDA=1 into build/cuda (apart from the CPU build), then loads it and checks the CUDA kernels are in.
CUDA_VENV ?= $(HOME)/.cache/due_ext/venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
# nvcc may sit in /usr/local/bin while the toolkit (libcudart) is in /usr/local/cuda
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda) $(patsubst %/bin/nvcc,%,$(shell command -v nvcc)))

cuda-build:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q $(CUDA_TORCH_SPEC) setuptools wheel ninja numpy
	rm -rf build/cuda
	CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) \
		$(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cuda/temp --build-lib build/cuda/lib
	cd build/cuda/lib && $(CUDA_VENV)/bin/python -c "import glob, torch; \
		torch.ops.load_library(glob.glob('due_ext/_C*.so')[0]); \
		assert torch.ops.due_ext.compiled_with_cuda(), 'CUDA kernels missing'; \
		print('due_ext CUDA build OK (torch', torch.__version__, ')')"

clean:
	rm -rf build $(VENV) due_ext/_C*.so *.egg-info
