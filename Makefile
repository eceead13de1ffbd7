# Every target creates .venv on first use and installs what it needs.
# torch==2.13.0 is installed first: that pin takes the local CPU build here
# (the package itself only asks for torch>=2.4).
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test test-long bench clean

.venv/.installed: pyproject.toml
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all,dev]"
	touch $@

demo: .venv/.installed
	.venv/bin/ckpts demo

test: .venv/.installed
	.venv/bin/ruff check src tests benchmarks examples
	.venv/bin/mypy
	.venv/bin/pytest -q

# Opt-in long mode: 200 SIGKILL trials (sync + async) and 2,000 fuzz examples per target.
test-long: .venv/.installed
	CKPTS_LONG=1 .venv/bin/pytest -q -p no:cacheprovider tests/test_kill_harness.py tests/test_fuzz.py

bench: .venv/.installed
	$(PY) -m benchmarks.run

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
