# The README's two commands are `make run` and `make test`; both set up the
# virtual environment first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,serve,dev
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run test evaluate train-digits train-sentiment_lstm train-sentiment_bilstm train-all bench-text clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The service's main job. Until the gateway exists: load the shipped SavedModels
# through their serving signatures and evaluate them on the full test splits.
run: setup
	$(PY) -m training.evaluate

test: setup
	$(PY) -m pytest

# Reproduce the shipped models (each exports the next version under models/).
train-digits: setup
	$(PY) -m training digits
train-sentiment_lstm: setup
	$(PY) -m training sentiment_lstm
train-sentiment_bilstm: setup
	$(PY) -m training sentiment_bilstm
train-all: train-digits train-sentiment_lstm train-sentiment_bilstm

bench-text: setup
	$(PY) bench/text_preprocessing.py

clean:
	rm -rf $(VENV) .pytest_cache
