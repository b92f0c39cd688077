# tether — run `make` for the list of targets.

SHELL := /bin/bash
GO ?= go
BIN := bin
TOOLS := $(CURDIR)/.tools
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.5.1
STATICCHECK_VERSION := v0.8.2
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# The managed plugin's name is the volume driver's name; volumes remember
# it, so keep it stable across upgrades. PLUGIN_SET: `docker plugin set`
# arguments applied before enabling (mount sources, agent args).
PLUGIN ?= tether:latest
PLUGIN_SET ?=
# Docker names the driver NAME:TAG (":latest" when no tag is given); the
# agent must know it to find its containers (fencing, re-creation).
PLUGIN_REF = $(if $(findstring :,$(PLUGIN)),$(PLUGIN),$(PLUGIN):latest)
LDFLAGS := -s -w -X github.com/tether-io/tether/agent.Version=$(VERSION)

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this list.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build the static binary bin/tether.
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/tether ./cmd/tether

.PHONY: image
image: build ## Build the FROM-scratch agent image tether:latest (and tether:$(VERSION)).
	cp $(BIN)/tether deploy/tether
	docker build -q -t tether:latest -t tether:$(VERSION) -f deploy/Dockerfile deploy; rc=$$?; rm -f deploy/tether; exit $$rc

.PHONY: plugin
plugin: build ## Build the managed Docker plugin $(PLUGIN) in bin/plugin (rootfs + config.json), create it, apply PLUGIN_SET, enable it.
	rm -rf $(BIN)/plugin
	mkdir -p $(BIN)/plugin/rootfs/tmp $(BIN)/plugin/rootfs/etc/tether $(BIN)/plugin/rootfs/var/lib/tether $(BIN)/plugin/rootfs/run/docker/plugins
	cp $(BIN)/tether $(BIN)/plugin/rootfs/tether
	sed 's|@PLUGIN@|$(PLUGIN_REF)|' deploy/plugin/config.json > $(BIN)/plugin/config.json
	docker plugin create $(PLUGIN_REF) $(BIN)/plugin
	$(if $(PLUGIN_SET),docker plugin set $(PLUGIN_REF) $(PLUGIN_SET))
	docker plugin enable --timeout 30 $(PLUGIN_REF)

.PHONY: test
test: ## Run every test with the race detector.
	$(GO) test -race -count=1 -timeout 15m ./...

.PHONY: e2e
e2e: ## Multi-host tests on the real Docker Engine (hosts as containers; needs docker and busybox-static).
	TETHER_E2E=1 $(GO) test -count=1 -timeout 25m -v ./e2e/... 2>&1 | tee e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|│)|Error|_test.go'; test $${PIPESTATUS[0]} -eq 0

.PHONY: bench
bench: ## Replication benchmarks: initial sync (20,000 small files; 1 GiB file; 1 GiB kept busy by a writer) beside rsync --fsync and the disk's fsync'd write speed, small-write lag p50/p99, 1 MiB changed in a 1 GiB file (time, wire bytes), no-change rescan of 20,000 files.
	@# The lag first, on an idle file system: the other benchmarks delete tens of thousands
	@# of files, and on a file system mounted with discard the sync points wait for those
	@# discards for a while after (BENCHMARKS.md, session 9).
	$(GO) test -run '^$$' -bench 'SmallWriteLag' -benchtime 1x ./replication/
	$(GO) test -run '^$$' -bench . -skip 'SmallWriteLag' -benchtime 1x -timeout 30m ./replication/

.PHONY: demo
demo: build ## Run the three-node demo: replicate a volume, kill its primary, fail over.
	$(BIN)/tether demo

$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

$(TOOLS)/staticcheck:
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

.PHONY: proto
proto: $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc ## Regenerate proto/tetherpb from proto/*.proto (needs protoc: apt-get install protobuf-compiler).
	@command -v protoc >/dev/null || { echo "protoc not found: apt-get install protobuf-compiler"; exit 1; }
	mkdir -p proto/tetherpb
	PATH=$(TOOLS):$$PATH protoc -I proto \
		--go_out=proto/tetherpb --go_opt=paths=source_relative \
		--go-grpc_out=proto/tetherpb --go-grpc_opt=paths=source_relative \
		proto/*.proto

.PHONY: proto-drift
proto-drift: $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc
	@tmp=$$(mktemp -d); \
	PATH=$(TOOLS):$$PATH protoc -I proto --go_out=$$tmp --go_opt=paths=source_relative \
		--go-grpc_out=$$tmp --go-grpc_opt=paths=source_relative proto/*.proto; \
	if ! diff -r -q $$tmp proto/tetherpb; then rm -rf $$tmp; echo "generated protobuf code drifted from proto/*.proto: run make proto"; exit 1; fi; \
	rm -rf $$tmp

.PHONY: check
check: $(TOOLS)/staticcheck ## gofmt, go vet, staticcheck, go.mod tidiness, generated-code drift.
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(TOOLS)/staticcheck ./...
	@cp go.mod /tmp/tether-go.mod.bak; cp go.sum /tmp/tether-go.sum.bak; \
	$(GO) mod tidy; \
	if ! diff -q go.mod /tmp/tether-go.mod.bak >/dev/null || ! diff -q go.sum /tmp/tether-go.sum.bak >/dev/null; then \
		cp /tmp/tether-go.mod.bak go.mod; cp /tmp/tether-go.sum.bak go.sum; echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; fi
	@$(MAKE) --no-print-directory proto-drift
	@echo "check: ok"

.PHONY: ci
ci: check test demo e2e ## What CI runs: check, tests, the demo, the Docker end-to-end tests.

.PHONY: clean
clean: ## Remove build outputs.
	rm -rf $(BIN)
