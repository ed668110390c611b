# EESD Serve. Every target installs what it needs; `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CLIENT_STAMP := $(VENV)/.client-installed
PYTEST_ARGS ?=
# Every Python package of the venv, exact versions and sha256 hashes (pip-tools; `make lock` writes it).
LOCK   := requirements.lock
# This machine's CPU build of torch lies here as a wheel; PyPI's torch for Linux is the CUDA build.
TORCH_WHEELS ?= /opt/wheels

.PHONY: setup test test-slow lint demo run clean deploy-tools manifests lock check-lock

setup: $(STAMP) proto $(CLIENT_STAMP)

# The venv is exactly requirements.lock: pip itself first, then every locked package at its pinned version,
# hashes checked, no resolver (--no-deps); pip-sync removes whatever the lock no longer lists. The projects
# install without dependencies and without build isolation, so their build backend (setuptools) is the
# locked one too. Redone when the lock or pyproject.toml changed, a no-op otherwise.
$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "requirements.lock is for Python 3.11")'
	awk '/^pip==/ { p = 1 } p { print } p && !/\\$$/ { exit }' $(LOCK) > $(VENV)/pip.lock
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(VENV)/pip.lock
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip-sync -q $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The client SDK installs from client/ (its own package, no torch) once its stubs are generated. Its
# dependencies (grpcio, protobuf) are the lock's; `make check-lock` runs pip check over both.
$(CLIENT_STAMP): $(STAMP) eesd_proto/.generated client/pyproject.toml
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e ./client
	touch $@

# Fails on any difference between the venv and requirements.lock (tests/test_lock.py; `make test` runs it too).
check-lock: setup
	$(BIN)/python -m pytest -q tests/test_lock.py

# Refreshes the locks on purpose (nothing else writes them); `make setup` then installs the result.
# requirements.lock: pyproject.toml with every extra, client/pyproject.toml and requirements.in, compiled
# for this machine (Python 3.11, torch's CPU wheel from $(TORCH_WHEELS)). Pins already there are kept while
# they still fit: LOCK_ARGS=--upgrade moves everything to the newest releases, LOCK_ARGS="--upgrade-package
# transformers" one package. Then the images' per-role locks (deploy/docker/lock/) are compiled from their
# .in files with requirements.lock as constraints, so the images get the same versions and hashes.
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile -q --generate-hashes --strip-extras \
	--no-build-isolation --find-links $(TORCH_WHEELS) --no-emit-index-url
DOCKER_LOCKS := deploy/docker/lock
lock: $(STAMP)
	$(PIP_COMPILE) --allow-unsafe --all-extras $(LOCK_ARGS) -o $(LOCK) pyproject.toml client/pyproject.toml requirements.in
	for role in protos controller; do \
	  rm -f $(DOCKER_LOCKS)/$$role.txt; \
	  $(PIP_COMPILE) --allow-unsafe --no-emit-find-links -c $(LOCK) -o $(DOCKER_LOCKS)/$$role.txt $(DOCKER_LOCKS)/$$role.in \
	    || exit 1; \
	done
	rm -f $(DOCKER_LOCKS)/model.txt
	$(PIP_COMPILE) --unsafe-package torch --no-emit-find-links -c $(LOCK) -o $(DOCKER_LOCKS)/model.txt $(DOCKER_LOCKS)/model.in
	{ echo "# Written by make lock: requirements.lock's torch without its local label (+cpu). The image's"; \
	  echo "# torch stage takes this version from the PyTorch index of the build it wants (cpu, cu128, ...)."; \
	  sed -n 's/^torch==\([^+ ]*\).*/torch==\1/p' $(LOCK); } > $(DOCKER_LOCKS)/torch.txt

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

# The main job: text prompts streamed through the distributed stack (started here unless `make run` is up),
# with and without speculation, and the speedup. Serves the reference model once `make model` built it, else
# the demo model, which the first run builds and distills (~4 minutes on 2 cores with native bf16, ~14 in fp32 on
# an AVX2-only CPU; cached in .cache/demo-model).
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
EXIT_LAYER ?= 1
REFERENCE  := .cache/reference-model
# eesd.heads owns the head directory's name; `=`, so it is asked only when a recipe runs (after setup).
EXIT_HEAD   = $(shell $(BIN)/python -m eesd.heads $(REFERENCE) $(EXIT_LAYER))
.PHONY: exit-head bench bench-concurrency
exit-head: setup
	$(BIN)/python -m eesd.cli model --skip-build --out $(REFERENCE) --exit-layer $(EXIT_LAYER)

# Benchmarks on the reference model and its held-out prompts, greedy and T=0.7, interleaved, medians of 3:
# bench/results/reference.json + PNGs, and the Markdown table docs/benchmarks.md quotes. The policies run with
# their default options; the TUNE_POLICIES option sets are tried first on 4 other held-out prompts (other
# source files than the 4 evaluation prompts') and each policy's best there is shown beside, labelled tuned.
TUNE_POLICIES ?= beta-ts[discount=0.8],beta-ts[draft_cost=0.25;alpha=4],beta-ts[draft_cost=0.25;discount=0.8],beta-ts[load_aware=1],calibration-ts[discount=0.8],calibration-ts[min_accept=0.25;discount=0.8],calibration-ts[min_accept=0.4]
BENCH_PROMPTS := 4
BENCH_ARGS ?= --num-prompts $(BENCH_PROMPTS) --num-tune-prompts 4 --max-new-tokens 96 --repetitions 3
bench: model
	$(BIN)/python -m eesd.cli bench --model $(REFERENCE) --exit-layer $(EXIT_LAYER) --exit-head $(EXIT_HEAD) \
	  --prompts $(REFERENCE)/heldout_prompts.jsonl --policies heuristic,threshold,beta-ts,calibration-ts \
	  --tune-policies "$(TUNE_POLICIES)" --name reference $(BENCH_ARGS) | tee bench/results/reference.md

# Choosing N for the reference model (eesd sweep): a quick exit layer distilled for N = 1, 2, 3, 4, 6 (cached
# under .cache/sweep), each measured against plain decoding on held-out prompts; the recommended N is the
# fastest; the prompts `make bench` evaluates on are left out, so choosing N never sees them.
# bench/results/sweep.json + .png + .md, quoted in docs/benchmarks.md.
.PHONY: sweep
SWEEP_ARGS ?=
sweep: model
	$(BIN)/python -m eesd.cli sweep --model $(REFERENCE) --name sweep --skip-evaluation-prompts $(BENCH_PROMPTS) \
	  $(SWEEP_ARGS) | tee bench/results/sweep.md

# The concurrency sweep (1..32 sessions; off, fixed k, Beta-TS, load-aware; batched vs one session per pass;
# in-process and through the stack): bench/results/concurrency.json + .png, quoted in docs/benchmarks.md.
CONCURRENCY_ARGS ?= --repetitions 3
bench-concurrency: model redis
	$(BIN)/python -m bench.concurrency $(CONCURRENCY_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Deployment checks need the real Helm engine (helm-python-sdk bundles Helm v4 as a shared library, no
# binary download) and Kubernetes JSON schemas (kubernetes-validate). Both are the `deploy` extra, so
# requirements.lock holds them and `make setup` installs them; the name stays for the targets that use it.
deploy-tools: $(STAMP)

# The chart's values.schema.json, generated from the services' config dataclasses, then the plain kubectl
# manifests under deploy/k8s/, rendered from the Helm chart (the single source of truth).
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

# A short load-test sweep (concurrency 1,2,4,8 x speculation on/off) against a LocalStack of the default model
# (the reference model once `make model` built it, else the demo model, built on first use): JSON (with the
# model, commit, machine and load average) + PNG plots (SLO lines, throughput-latency curve) in loadtest/results/.
# Run it on a quiet machine (1-minute load average well under the core count: `cat /proc/loadavg`).
# docs/observability.md explains the report; LOADTEST_ARGS adds flags (`python -m loadtest --help`).
.PHONY: loadtest
loadtest: setup
	$(BIN)/python -m loadtest --local-stack --sweep --concurrency 1,2,4,8 --requests 16 --max-new-tokens 32 \
	  --out loadtest/results $(LOADTEST_ARGS)

# Hostile input against a LocalStack of the default model in float32 (issue #12): every field of every public
# and internal request message fuzzed from the protobuf descriptors (1000 requests, seed 0), 300 simultaneous
# new sessions, 100 maximum-size prompts against the controller's RSS, the stall of 1 MB and 4 MB text
# prompts; report in loadtest/results/hostile.json (HOSTILE_ARGS adds flags: `python -m loadtest.hostile --help`).
.PHONY: hostile
hostile: setup redis
	$(BIN)/python -m loadtest.hostile --local-stack --redis --out loadtest/results/hostile.json $(HOSTILE_ARGS)

# Fault trials (issue #13): on a LocalStack of the default model in float32 with two controllers sharing Redis
# (AOF on, behind a TCP proxy), two drafters and two verifiers, greedy sessions through the SDK pointed at
# both controllers meet kill -9 and SIGSTOP of each role, Redis killed (restarted empty or from its AOF),
# paused and unreachable; every output is compared with transformers' greedy decoding. About 50 minutes on
# 2 cores; report in loadtest/results/faults.json (FAULTS_ARGS adds flags: `python -m loadtest.faults --help`).
.PHONY: faults
faults: setup redis
	$(BIN)/python -m loadtest.faults --out loadtest/results/faults.json $(FAULTS_ARGS)
