# The two commands of README.md: `make demo` and `make test`, on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= out/demo
DEMO_DATA ?= var/demo
DEMO_SERVER ?= 127.0.0.1:50151

.PHONY: demo test proto clean

# The venv is a file target: rebuilt when the project's dependencies change.
$(VENV): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24"
	$(PIP) install -c constraints-cpu.txt -e ".[dev]"
	@touch $(VENV)

# The demo runs the real thing: the daemon in the background on the embedded defaults (tiny preset,
# CPU, loopback), the example story submitted and watched with progress bars, its artifacts
# downloaded to $(DEMO_OUT) (--force: replacing an earlier demo's files, a story of another id),
# then the daemon stopped with SIGTERM (a clean, graceful exit).
demo: $(VENV)
	@rm -rf $(DEMO_DATA) && mkdir -p $(DEMO_DATA)
	@set -e; \
	$(VENV)/bin/storyfarm serve --data-dir $(DEMO_DATA) --listen $(DEMO_SERVER) > $(DEMO_DATA)/daemon.log 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid' EXIT; \
	for i in $$(seq 120); do $(VENV)/bin/storyfarm pool --server $(DEMO_SERVER) > /dev/null 2>&1 && break; sleep 1; done; \
	id=$$($(VENV)/bin/storyfarm submit configs/stories/lighthouse.yaml --server $(DEMO_SERVER) --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["story_id"])'); \
	echo "submitted story $$id"; \
	$(VENV)/bin/storyfarm watch $$id --server $(DEMO_SERVER); \
	$(VENV)/bin/storyfarm download $$id --out $(DEMO_OUT) --force --server $(DEMO_SERVER); \
	echo "story video: $(DEMO_OUT)/story.mp4 (daemon log: $(DEMO_DATA)/daemon.log)"

test: $(VENV)
	$(VENV)/bin/pytest -q

# Regenerate proto/storyfarm/v1/*_pb2*.py after editing render.proto (tests check they match).
proto: $(VENV)
	PYTHON=$(PY) proto/generate.sh

clean:
	rm -rf $(VENV) out build *.egg-info
