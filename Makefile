# The two commands of the README:  make demo   and   make test
# Everything else (the virtual environment, torch, the C++ build) is set up on the way.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
SOURCES := $(wildcard csrc/*.cpp csrc/*.h) setup.py pyproject.toml

.PHONY: demo test bench build venv clean

demo: build
	$(VENV)/bin/fastint demo

test: build
	$(PY) -m pytest -q

bench: build
	$(PIP) install -q matplotlib "diffusers==0.42.1"
	$(PY) -m pytest -q bench --benchmark-only --benchmark-max-time=0.5 --benchmark-columns=min,median,mean,stddev,ops

build: $(VENV)/.built

venv: $(VENV)/.deps

# torch first, pinned to the local CPU wheel: nothing may let pip resolve torch on its own.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q "setuptools>=64" wheel ninja numpy triton scipy tqdm scikit-learn pytest pytest-benchmark hypothesis
	$(PIP) install -q "diffusers==0.42.1"
	# drop-in tests: these would pull torch(vision) through their dependencies, so --no-deps
	$(PIP) install -q --no-deps "transformers==5.23.0" "tokenizers>=0.22" "k-diffusion==0.1.1.post1"
	touch $@

# --no-build-isolation: build against the torch installed above, never a second copy.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e ".[test]"
	touch $@

clean:
	rm -rf build fastint/_C*.so $(VENV)/.built
