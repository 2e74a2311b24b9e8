# The two commands of README.md: `make demo` and `make test`, on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= out/demo

.PHONY: demo test proto clean

# The venv is a file target: rebuilt when the project's dependencies change.
$(VENV): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24"
	$(PIP) install -c constraints-cpu.txt -e ".[dev]"
	@touch $(VENV)

demo: $(VENV)
	$(VENV)/bin/storyfarm render configs/stories/lighthouse.yaml --preset tiny --out $(DEMO_OUT) --seed 7
	@echo "story video: $(DEMO_OUT)/story.mp4"

test: $(VENV)
	$(VENV)/bin/pytest -q

# Regenerate proto/storyfarm/v1/*_pb2*.py after editing render.proto (tests check they match).
proto: $(VENV)
	PYTHON=$(PY) proto/generate.sh

clean:
	rm -rf $(VENV) out build *.egg-info
