# The README's two commands are `make run` and `make test`; both set up the
# virtual environment first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# storage: fsspec/s3fs/gcsfs for `python -m serving pull` (tests/serving/test_pull.py); tracing: the
# OpenTelemetry SDK and OTLP exporter, so that `make run` with OTEL_TRACES_EXPORTER=otlp traces
# (serving/tracing.py) and the tracing tests run; the gateway works without either (tracing off).
EXTRAS ?= train,serve,tracing,embedded,storage,dev
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup run stage bench-stage test evaluate protos bench-gateway bench-overload bench-tfserving bench-client bench-capacity bench-whole-text train-digits train-sentiment_lstm train-sentiment_bilstm train-all train-v2 train-v3 train-v4 bench-text bench-model-options clean plots plot-capacity plot-accuracy test-tools

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
# BENCH_GATEWAY_ARGS=--tracing: instead, the gateway's own cost with tracing off and on, side by side.
BENCH_GATEWAY_ARGS ?=
bench-gateway: setup
	$(PY) bench/gateway.py $(BENCH_GATEWAY_ARGS)

# The gateway at 4x its capacity with 1,024-text requests: goodput, p99 of admitted requests, speed of 429s.
bench-stage: setup test-tools
	$(PY) bench/stage_capacity.py --json bench/results/stage_capacity.json

bench-overload: setup
	$(PY) bench/overload.py --grpc --times 4 50 --json bench/results/overload.json

# The gateway's own CPU cost per text with the TF Serving backend (against the stand-in).
bench-tfserving: setup
	$(PY) bench/tfserving_cost.py

# The Locust step ramp against a gateway on each backend (embedded; TF Serving stand-in): knee and p50/p99.
bench-capacity: setup
	$(PY) bench/capacity.py

# TensorFlow runtime options (oneDNN, thread pools, XLA) on the served signatures at batch 1/8/64/256.
bench-model-options: setup
	$(PY) bench/model_options.py

# Whole-text scoring vs the default (last 20 tokens) through the gateway, and the raw model on the same windows.
bench-whole-text: setup
	$(PY) bench/whole_text.py --json bench/results/whole_text.json

# The CLI over the gRPC stream on the full IMDB test split vs the raw batched model call.
bench-client: setup
	$(PY) bench/client.py --json bench/results/client.json

# The README's plots (docs/plots/, bench/plots.py): the step ramp re-run on both backends, then
# latency against throughput; accuracy by review length of every sentiment version (full test split).
plots: plot-capacity plot-accuracy
plot-capacity: setup
	$(PY) bench/capacity.py
	$(PY) bench/plots.py capacity
plot-accuracy: setup
	$(PY) bench/plots.py accuracy

# Debian packages some tests use: headless Chromium (the console's browser tests),
# promtool (alerting rules and the Grafana dashboard's queries) and docker-compose (only
# `config`: the compose files as Compose itself reads them) and nginx (the stage, `make stage`). Each is installed when
# missing and possible (apt, root); where not, those tests are skipped and say why.
TEST_TOOLS := chromium:chromium promtool:prometheus docker-compose:docker-compose nginx:nginx-light
test-tools:
	@for pair in $(TEST_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$cmd >/dev/null 2>&1 && continue; \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    { apt-get install -y -q $$pkg >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$pkg >/dev/null 2>&1; }; }; } || \
	  echo "$$pkg could not be installed: the tests that need $$cmd will be skipped"; \
	done

# The whole deployment on this machine until Ctrl-C (stage/): model servers (the TF Serving
# stand-in), gateways (TF Serving backend, round_robin), nginx and Prometheus with the alerts.
STAGE_ARGS ?= --gateways 2 --model-servers 2
stage: setup test-tools
	$(PY) -m stage $(STAGE_ARGS)

# The suite on TEST_WORKERS processes (pytest-xdist), one test file each at a time;
# TEST_WORKERS=0 runs it in this process (plain `pytest` runs everything, the stage included).
TEST_WORKERS ?= 2
# Then the stage's tests (marker stage) alone: they load the whole machine on purpose (capacity,
# goodput past it), which another test file beside them would skew. Both always run; either failing
# fails the target.
test: setup test-tools
	@$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not stage"; main=$$?; \
	  $(PY) -m pytest -m stage; stage=$$?; \
	  echo "make test: suite exit $$main, stage exit $$stage"; [ $$main = 0 ] && [ $$stage = 0 ]

# Reproduce the shipped models (each exports the next version under models/).
train-digits: setup
	$(PY) -m training digits
train-sentiment_lstm: setup
	$(PY) -m training sentiment_lstm
train-sentiment_bilstm: setup
	$(PY) -m training sentiment_bilstm
train-all: train-digits train-sentiment_lstm train-sentiment_bilstm
# Version 2 (issue 11): window training for the text models (training/windows.py),
# shift augmentation + cosine schedule for digits; card figures from training/metrics.py.
train-v2: setup
	$(PY) -m training digits --epochs 20 --batch-size 128 --shift 2 --lr-schedule cosine --metrics --version 2
	$(PY) -m training sentiment_lstm --epochs 4 --batch-size 128 --windows r3s1 --whole-text-stride 20 --version 2
	$(PY) -m training sentiment_bilstm --epochs 5 --batch-size 64 --windows r3s1 --lr-schedule cosine --whole-text-stride 20 --version 2

# Version 3 of sentiment_lstm: trained through the whole-text combination (training/review_objective.py).
train-v3: setup
	$(PY) -m training sentiment_lstm --objective review --epochs 10 --batch-size 32 --lr-schedule cosine --whole-text-stride 20 --version 3

# The review objective with the n-gram teacher's term (training/teacher.py).
train-v4: setup
	$(PY) -m training sentiment_lstm --objective review --teacher-weight 2 --epochs 10 --batch-size 32 --lr-schedule cosine --whole-text-stride 20 --version 4

bench-text: setup
	$(PY) bench/text_preprocessing.py

clean:
	rm -rf $(VENV) .pytest_cache

# Load tests (loadtests/locustfile.py, Locust): each targets a gateway that is already
# running (make run, or docker compose up) at HOST (REST) and GRPC; none starts one.
# Reports: $(LOAD_OUT)/<profile>_stats.csv, _stats_history.csv, _failures.csv, .html
# (the ramp and spike also _steps.csv). A broken SLO (loadtests/slo.toml) exits non-zero;
# the ramp prints the knee. Extra Locust options: LOCUST_ARGS='--knee-p99-ms 250 ...'.
HOST ?= http://localhost:8000
GRPC ?= localhost:50051
LOAD_OUT ?= bench/results/load
LOCUST_ARGS ?=
LOCUST_RUN = $(VENV)/bin/locust -f loadtests/locustfile.py --headless --host $(HOST) --grpc-host $(GRPC) --only-summary
.PHONY: load-smoke load-ramp load-spike

load-smoke: setup
	mkdir -p $(LOAD_OUT)
	$(LOCUST_RUN) -u 8 -r 8 -t 30s --csv $(LOAD_OUT)/smoke --html $(LOAD_OUT)/smoke.html $(LOCUST_ARGS)

load-ramp: setup
	mkdir -p $(LOAD_OUT)
	$(LOCUST_RUN) --shape ramp --csv $(LOAD_OUT)/ramp --csv-full-history --html $(LOAD_OUT)/ramp.html $(LOCUST_ARGS)

load-spike: setup
	mkdir -p $(LOAD_OUT)
	$(LOCUST_RUN) --shape spike --csv $(LOAD_OUT)/spike --html $(LOAD_OUT)/spike.html $(LOCUST_ARGS)
