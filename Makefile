# fastfcn-jax developer commands. `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/fastfcn_demo
# Both cores by default; override with `make test JOBS=1`. Work stealing, as the tests take 0.1-300 s each
# and a fixed split can leave one core idle at the end.
JOBS ?= 2

.PHONY: install lock test demo lint benchmark clean

# The versions in constraints.txt (the set the suite last passed with; pyproject.toml keeps ranges), applied
# under the Python they were made with (its '# python X.Y' line); another Python gets the newest allowed.
PINS = $$($(PY) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; print("-c constraints.txt" if f"\# python {v}\n" in open("constraints.txt").read() else "")')

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PINS) -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(PINS) 'jax2onnx>=0.17.1,<0.18'  # its deps: the onnx extra (pyproject.toml)
	touch $@

install: $(VENV)/.installed

# constraints.txt anew: the newest versions pyproject.toml allows, installed in a scratch venv (the next
# `make test` installs them into .venv and runs the suite on them).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e '.[test]'
	.venv-lock/bin/python -m pip install --quiet --no-deps 'jax2onnx>=0.17.1,<0.18'
	head -n 3 constraints.txt > constraints.txt.new
	.venv-lock/bin/python -c 'import sys; print("# python %d.%d" % sys.version_info[:2])' >> constraints.txt.new
	.venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -e '^-e' -e '@ file' -e '^#' >> constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-lock

test: $(VENV)/.installed
	$(PY) -m ruff check fastfcn_jax tests configs experiments
	$(PY) -m pytest -n $(JOBS) --dist worksteal --durations=15 tests

demo: $(VENV)/.installed
	$(PY) -m fastfcn_jax.main --config configs/demo.py --workdir $(WORKDIR)

lint: $(VENV)/.installed
	$(PY) -m ruff check fastfcn_jax tests configs experiments
	$(PY) -m ruff format --check fastfcn_jax tests configs experiments

benchmark: $(VENV)/.installed
	$(PY) experiments/benchmark.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
