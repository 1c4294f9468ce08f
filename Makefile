# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each depends on `setup`, which installs what is missing and is quick when nothing is.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STREAMREC := $(BIN)/streamrec

.PHONY: setup go-tools bench-tools system-deps demo test lint unit integration bench stack-up stack-down stack-status stack-logs clean

setup: system-deps $(VENV)/.installed go-tools
	$(STREAMREC) setup

# Real gRPC clients: grpcurl (reflection, JSON calls; the tests and the demo's hints use it) and
# ghz (load; only the benchmarks use it, so `make bench` builds it, not `make test`).
GOBIN ?= $(HOME)/go/bin
GRPCURL_VERSION := v1.9.3
GHZ_VERSION := v0.120.0
# The Helm chart's checks (tests/unit/test_helm_chart.py): helm lint and template, and kubeconform
# with the Kubernetes schemas of the kubernetes-validate package plus infra/helm/schemas for CRDs.
HELM_VERSION := v4.3.2
KUBECONFORM_VERSION := v0.8.0
go-tools: $(GOBIN)/grpcurl $(GOBIN)/helm $(GOBIN)/kubeconform
bench-tools: $(GOBIN)/ghz
$(GOBIN)/grpcurl:
	go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)
$(GOBIN)/helm:
	go install helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)
$(GOBIN)/kubeconform:
	go install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)
$(GOBIN)/ghz:
	go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

system-deps:
	bash infra/setup-system.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# MovieLens-100K ships inside the recbole wheel; --no-deps keeps torch out (never imported).
	$(BIN)/pip install -q --no-deps recbole
	touch $@

# The stack stays up afterwards (Prometheus with every target, the API): `streamrec status`
# shows it, `streamrec stack down` (or `make clean`) stops it; the demo's last lines say how to reach it.
demo: setup
	$(STREAMREC) demo --keep-running

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

# ruff, mypy, the import contracts, then every test level; pytest starts the real Kafka and Redis it needs.
# Two xdist workers: the unit tests on one, every test with real services on the other (tests/conftest.py).
test: lint
	$(BIN)/pytest -ra --durations=25 -n 2 --dist loadgroup

unit: setup
	$(BIN)/pytest -m unit

integration: setup
	$(BIN)/pytest -m integration

bench: setup bench-tools
	$(BIN)/python -m bench.replay_throughput
	$(BIN)/python -m bench.ingest_throughput
	$(BIN)/python -m bench.model_swap
	$(BIN)/python -m bench.recommend_load
	$(BIN)/python -m bench.trainer_throughput
	$(BIN)/python -m bench.offline_quality
	$(BIN)/python -m bench.prequential
	$(BIN)/python -m bench.loop_decisions
	$(BIN)/python -m bench.loop_online
	$(BIN)/python -m bench.cluster_ingest
	$(BIN)/python -m bench.leader_kill_recovery
	$(BIN)/python -m bench.distributed_training
	$(BIN)/python -m bench.secure_ingest
	$(BIN)/python -m bench.secure_recommend

stack-up: setup
	$(STREAMREC) stack up

stack-down:
	$(STREAMREC) stack down

stack-status:
	$(STREAMREC) stack status

stack-logs:
	$(STREAMREC) stack logs $(or $(NAME),kafka)

clean: stack-down
	rm -rf .state
