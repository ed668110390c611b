# EESD Serve. Every target installs what it needs; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CLIENT_STAMP := $(VENV)/.client-installed
PYTEST_ARGS ?=

.PHONY: setup test test-slow lint demo run clean deploy-tools manifests

setup: $(STAMP) proto $(CLIENT_STAMP)

# torch first and pinned: the CPU wheel lies on the machine; a dependency asking for torch later must
# find it installed, or pip pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The client SDK installs from client/ (its own package, no torch) once its stubs are generated.
$(CLIENT_STAMP): $(STAMP) eesd_proto/.generated client/pyproject.toml
	$(BIN)/pip install -q -e ./client
	touch $@

# Fast suite (well under 15 minutes on 2 cores). pytest exit 5 means nothing was collected: fail loudly.
test: setup deploy-tools proto-tools redis
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# Slow checks, run by CI after the fast suite.
test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no slow tests collected"; exit 0; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The main job: prompts streamed through the distributed stack (started here unless `make run` is up).
demo: setup redis
	$(BIN)/python -m serving.demo $(DEMO_ARGS)

# The stack in the foreground: redis-server, controller on :50051, one drafter, one verifier.
run: setup redis
	$(BIN)/python -m serving.local_stack --redis $(RUN_ARGS)

# The reference model: BPE tokenizer + small Llama trained on the stdlib's source, cached (no-op when built).
.PHONY: model
model: setup
	$(BIN)/python -m eesd.reference_model --out .cache/reference-model
	$(MAKE) --no-print-directory exit-head

# Second step of `make model`: the exit layer distilled from the model itself (eesd distill on continuations
# of prompts from the model's training files). Cached: skipped while the head matches recipe and model build.
EXIT_LAYER ?= 2
REFERENCE  := .cache/reference-model
EXIT_HEAD  := $(REFERENCE)-exit-head-n$(EXIT_LAYER)
.PHONY: exit-head bench
exit-head: setup
	$(BIN)/python -m eesd.cli model --skip-build --out $(REFERENCE) --exit-layer $(EXIT_LAYER)

# Benchmarks on the reference model and its held-out prompts, greedy and T=0.7, interleaved, medians of 3:
# bench/results/reference.json + PNGs, and the Markdown table docs/benchmarks.md quotes.
BENCH_ARGS ?= --num-prompts 4 --max-new-tokens 96 --repetitions 3 --policies "heuristic,threshold,beta-ts,calibration-ts,beta-ts[draft_cost=0.25;alpha=4],calibration-ts[min_accept=0.25;discount=0.8]"
bench: model
	$(BIN)/python -m eesd.cli bench --model $(REFERENCE) --exit-layer $(EXIT_LAYER) --exit-head $(EXIT_HEAD) \
	  --prompts $(REFERENCE)/heldout_prompts.jsonl --name reference $(BENCH_ARGS) | tee bench/results/reference.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Deployment checks need the real Helm engine (helm-python-sdk bundles Helm v4 as a shared library, no
# binary download) and Kubernetes JSON schemas (kubernetes-validate). Neither pulls torch.
DEPLOY_STAMP := $(VENV)/.deploy-tools
deploy-tools: $(DEPLOY_STAMP)

$(DEPLOY_STAMP): $(STAMP)
	$(BIN)/pip install -q helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
	touch $@

# Plain kubectl manifests under deploy/k8s/, rendered from the Helm chart (the single source of truth).
manifests: deploy-tools
	$(BIN)/python deploy/render.py

# Protocol: Python stubs of protos/ are generated at build time, never committed: eesd_proto/ for the
# services, client/eesd_client/_proto/ for the client SDK. Regenerated only when a proto changed.
PROTO_SRC   := $(wildcard protos/eesd/v1/*.proto)
PROTO_STAMP := eesd_proto/.generated
BUF_VERSION := 1.75.0
BUF         := .tools/node_modules/.bin/buf
.PHONY: proto proto-tools proto-lint

proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) eesd_proto/generate.py $(STAMP)
	$(BIN)/python eesd_proto/generate.py
	touch $@

# buf (npm package, repo-local under .tools/) lints the protos; tests/client runs it too.
proto-tools: $(BUF)

$(BUF):
	npm install --prefix .tools --no-audit --no-fund --silent @bufbuild/buf@$(BUF_VERSION)
	touch $@

proto-lint: proto-tools
	$(BUF) lint

# Integration tests run a real redis-server (tests/integration/conftest.py fails without it).
.PHONY: redis
redis:
	@command -v redis-server >/dev/null 2>&1 || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }

# A short load-test sweep (concurrency 1,2,4 x speculation on/off) against a LocalStack of the default model
# (the reference model once `make model` built it, else the tiny demo model): JSON + PNG in loadtest/results/.
# docs/observability.md explains the report; LOADTEST_ARGS adds flags (`python -m loadtest --help`).
.PHONY: loadtest
loadtest: setup
	$(BIN)/python -m loadtest --local-stack --sweep --concurrency 1,2,4 --requests 12 --max-new-tokens 32 \
	  --out loadtest/results $(LOADTEST_ARGS)
