# Two commands do all set-up on a fresh machine:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test test-fast gpu-check clean

# On a machine without an NVIDIA GPU pin torch to the local CPU wheel *first*: any unpinned torch
# requirement would otherwise pull multi-GB CUDA builds. deepspeed builds against the installed torch
# (--no-build-isolation), never a second torch in a build sandbox.
# pip byte-compiles what it installs one file at a time (about 60% of the install's CPU); installing with
# --no-compile and then compiling site-packages on every core: `make venv` from scratch on a 2-core machine, old and
# new back to back, 118 -> 114 s and 111 -> 90 s (disk-bound and noisy there; it uses more CPU, on both cores). A
# file that does not compile on this Python (torch ships py312-only test helpers) stays uncompiled, as pip leaves it.
PIP_INSTALL := $(PY) -m pip install -q --no-compile
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "NVIDIA GPU found: letting pip resolve torch"; $(PIP_INSTALL) torch; \
	else \
	    echo "no GPU: installing the CPU build torch==2.13.0"; $(PIP_INSTALL) torch==2.13.0; \
	fi
	$(PIP_INSTALL) --no-build-isolation -e ".[test]"
	@echo "byte-compiling site-packages on every core"
	@$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	    >/dev/null || true
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dist-train launch configs/demo.yaml
	$(VENV)/bin/dist-train plot runs/demo --out runs/demo/curves.png --extra tokens_per_s mfu memory
	@echo "curves: runs/demo/curves.png | TensorBoard: $(VENV)/bin/tensorboard --logdir runs/"

# Two pytest-xdist workers, each taking whole test files (module fixtures are set up once): run one after another
# the tests leave a core idle about a third of the time (process start-ups, waits on ranks and subprocesses); on
# the 2-core CI machine the whole suite went from 882 s to 616 s (same commit, same machine).
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The whole GPU path in one command (tests marked gpu + GPU benchmarks; report in $OUT or runs/gpu-check/).
# Uses the machine's python3 as it is: no venv, no install, the project on PYTHONPATH. On a machine
# without CUDA it is a smoke run (tests/test_gpu_check.py runs it as part of `make test`).
GPU_CHECK_PY ?= python3
gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_CHECK_PY) -m dist_train.gpucheck

clean:
	rm -rf $(VENV) runs .pytest_cache
