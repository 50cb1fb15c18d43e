# The README's two commands are `make run` and `make test`; both set up the
# virtual environment first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= train,serve,embedded,dev
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run test evaluate protos bench-gateway bench-overload bench-tfserving train-digits train-sentiment_lstm train-sentiment_bilstm train-all bench-text clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The service: REST on :8000 and gRPC on :50051, serving the SavedModels under
# models/ in-process (embedded backend). Ctrl-C stops it.
run: setup
	$(PY) -m serving

# Evaluate the shipped SavedModels through their serving signatures on the full test splits.
evaluate: setup
	$(PY) -m training.evaluate

# Regenerate serving/gen/ from protos/ (a test fails when it is stale).
protos: setup
	$(PY) -m serving.protogen

# Gateway vs raw batched model call vs naive baseline (needs wrk: apt-get install wrk).
bench-gateway: setup
	$(PY) bench/gateway.py

# The gateway at 4x its capacity with 1,024-text requests: goodput, p99 of admitted requests, speed of 429s.
bench-overload: setup
	$(PY) bench/overload.py --grpc --json bench/results/overload.json

# The gateway's own CPU cost per text with the TF Serving backend (against the stand-in).
bench-tfserving: setup
	$(PY) bench/tfserving_cost.py

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
