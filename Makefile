# fastfcn-jax developer commands. `make test` and `make demo` set up .venv themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= /tmp/fastfcn_demo
# Both cores by default; override with `make test JOBS=1`. Work stealing, as the tests take 0.1-300 s each
# and a fixed split can leave one core idle at the end.
JOBS ?= 2

.PHONY: install lock test demo lint benchmark clean

# The versions in constraints.txt: the set the suite last passed with (pyproject.toml keeps ranges).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# A fresh .venv with the newest versions pyproject.toml allows, written to constraints.txt (then run make test).
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	head -n 4 constraints.txt > constraints.txt.new
	$(PY) -m pip freeze --exclude-editable | grep -v -e '^-e' -e '@ file' -e '^#' >> constraints.txt.new
	mv constraints.txt.new constraints.txt
	touch $(VENV)/.installed

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
