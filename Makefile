VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m rpsconvert.demo

bench: install
	$(PY) benchmarks/convert_speed.py
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
