# largebatch — the README's two commands: `make demo` and `make test`.
# Both run the same idempotent setup first (system packages, .venv, torch, TF, Horovod).
VENV   ?= .venv
PY     := $(VENV)/bin/python

NP     ?= 2
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast doctor clean

setup:
	@bash launchers/setup.sh

demo: setup
	$(VENV)/bin/largebatch run examples/synthetic_torch.yaml --np $(NP)
	@echo
	@echo "next: the commands live in $(VENV); activate it first:  . $(VENV)/bin/activate"
	@echo "      largebatch doctor                                  # what is installed and usable"
	@echo "      largebatch report runs/synthetic_torch             # PNGs and a summary of the run above"
	@echo "      largebatch run examples/synthetic_keras.yaml --np 2"

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# core and single-process tests only (no horovodrun), for quick iteration
test-fast: setup
	$(PY) -m pytest -m "not multirank" $(PYTEST_ARGS)

doctor: setup
	$(VENV)/bin/largebatch doctor

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
