# Every target creates .venv on first use and installs what it needs.
# torch==2.13.0 is installed first: that pin takes the local CPU build here
# (the package itself only asks for torch>=2.4).
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test lint bench clean

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

bench: .venv/.installed
	$(PY) -m benchmarks.run

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
