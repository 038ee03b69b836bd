# Sluicegate — developer commands. `make run` for the offline demo, `make test` for the tests.
PYTHON ?= python3
PORT ?= 8080
MOCK_PORT ?= 18080
CONFIG ?= deploy/default_config.py
PYTEST_ARGS ?=

TORCH ?= torch==2.13.0

.PHONY: install compile uncompile test-compiled run mock test services pgvector lint bench bench-tools bench-peers bench-instructions bench-paired check-config eval-cache metering-demo

install:  ## the package (editable) with the test and lint tools, the semantic-cache and tokenizers extras
	@# CPU torch first: sentence-transformers would otherwise pull a multi-GB CUDA build.
	$(PYTHON) -m pip install --quiet --disable-pip-version-check '$(TORCH)'
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[dev,semantic,tokenizers]'

# mypyc (with mypy, in the dev extra) compiles the auth and quota layers' hot path in place
# (gateway/compiled.py lists it); the sources run again after `make uncompile`, and a build
# older than its sources is never used (gateway/compiled.py).
COMPILED = $(shell $(PYTHON) -c "from gateway.cli import main; main(['build', '--sources'])")
# build/ goes first: from an earlier build, setuptools copies each module's (unchanged) shim
# extension with its old time, which gateway/compiled.py would take for a stale build. The
# last line fails the target on a build that reads as stale (it would not be used). Every
# extension is removed first, strays of an earlier module list too (gateway/compiled.py).
compile:  ## compile the auth and quota hot path with mypyc, in place (`make uncompile` undoes it)
	cd $(CURDIR) && rm -rf build && $(PYTHON) -m gateway.cli build --remove >/dev/null && \
	  $(PYTHON) -m mypyc $(COMPILED)
	$(PYTHON) -m gateway.cli build

# The tests of what is compiled, run against the compiled build; the sources run again after,
# whatever the tests did.
COMPILED_TESTS = tests/gateway/test_policy.py tests/gateway/test_pricing.py \
  tests/gateway/test_tokens.py tests/gateway/test_compiled.py tests/gateway/test_doctor.py \
  tests/gateway/test_redis_topologies.py tests/gateway/test_resp_replies.py \
  tests/middleware/test_auth_*.py tests/middleware/test_quota_*.py \
  tests/middleware/test_failover_quota_below.py
test-compiled: install services  ## compile, run the compiled modules' tests against the build, uncompile
	$(MAKE) compile
	$(PYTHON) -m pytest $(COMPILED_TESTS) $(PYTEST_ARGS); rc=$$?; $(MAKE) uncompile; exit $$rc

uncompile:  ## remove the compiled modules: the sources run again
	$(PYTHON) -c "from gateway.cli import main; main(['build', '--remove'])"

run: install  ## offline demo: mock provider on $(MOCK_PORT), gateway on $(PORT)
	@$(PYTHON) -m tests.mock_providers --host 127.0.0.1 --port $(MOCK_PORT) & \
	  mock=$$!; trap 'kill $$mock 2>/dev/null' EXIT INT TERM; \
	  SLUICEGATE_DEMO_UPSTREAM=http://127.0.0.1:$(MOCK_PORT) \
	  $(PYTHON) -m gateway.cli serve --config $(CONFIG) --host 127.0.0.1 --port $(PORT)

mock:  ## the mock providers alone, in the foreground
	$(PYTHON) -m tests.mock_providers --host 127.0.0.1 --port $(MOCK_PORT)

check-config:
	$(PYTHON) -m gateway.cli check-config $(CONFIG)

services:  ## start local Redis and PostgreSQL if needed; build pgvector if missing
	bash deploy/scripts/services.sh

pgvector:  ## build and install pgvector for PostgreSQL 15 (idempotent)
	bash deploy/scripts/build_pgvector.sh

test: install services  ## everything the tests need, then the tests
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check --line-length 100 --target-version py311 gateway middleware providers tests deploy
	$(PYTHON) -m mypy

metering-demo: install services  ## PostgreSQL away for 12 s under load: zero failures, one row per request
	$(PYTHON) tests/bench/metering_outage.py $(DEMO_ARGS)

eval-cache: install  ## semantic cache hit/false-hit rates per threshold (tests/eval/RESULTS.md)
	HF_HUB_OFFLINE=1 $(PYTHON) tests/eval/eval_cache.py

bench-tools:  ## wrk, hey, nginx (the fast mock upstream), LiteLLM in its own venv, Portkey (npm)
	bash deploy/scripts/install_bench_tools.sh

bench: install bench-tools  ## the benchmark table (tests/bench/RESULTS.md), then the layers' paired ratios (PAIRED.md); not part of `make test`
	$(PYTHON) tests/bench/run_bench.py $(BENCH_ARGS)
	$(PYTHON) tests/bench/run_paired.py

bench-instructions: install bench-tools  ## each layer's CPU instructions per request, counted by callgrind (tests/bench/INSTRUCTIONS.md)
	$(PYTHON) tests/bench/run_instructions.py $(BENCH_ARGS)

bench-paired: install bench-tools  ## failover and metering beside bare, in alternating rounds (tests/bench/PAIRED.md)
	$(PYTHON) tests/bench/run_paired.py $(BENCH_ARGS)

bench-peers: install bench-tools  ## the production stack beside LiteLLM and Portkey: ratios in tests/bench/PEERS.md
	$(PYTHON) tests/bench/run_bench.py --targets direct,floor,bare,production,litellm,portkey \
		--scenarios json-c1,json-c16,json-c16-unique,sse-c16 --output tests/bench/PEERS.md $(BENCH_ARGS)
