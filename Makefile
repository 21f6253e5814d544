# Two commands: `make lab` opens the series, `make test` runs every test and notebook.
# Both create .venv on first use and reinstall only when requirements.txt or pyproject.toml change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed

.PHONY: lab test lint format server notebooks handout solutions site clean

lab: $(STAMP)
	$(BIN)/python -m js_request_reply lab

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools

format: $(STAMP)
	$(BIN)/ruff format src tests tools
	$(BIN)/ruff check --fix src tests tools

# Re-run every notebook in place to refresh its committed outputs (each kernel starts its own server).
notebooks: $(STAMP)
	cd notebooks && env -u NATS_URL ../$(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=120 --ExecutePreprocessor.record_timing=False [0-9][0-9]-*.ipynb

# Student copies: no outputs, each solution replaced by a stub that says what to write.
handout: $(STAMP)
	$(BIN)/python tools/handout.py --out build/handout notebooks/[0-9][0-9]-*.ipynb

# The same without outputs, solutions kept: the facilitator's copy.
solutions: $(STAMP)
	$(BIN)/python tools/handout.py --keep-solutions --out build/solutions notebooks/[0-9][0-9]-*.ipynb

# The series as a static website, from the committed notebooks (not re-executed).
site: $(STAMP)
	$(BIN)/python tools/site.py --out build/site

server: $(STAMP)
	$(BIN)/python -m js_request_reply server

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

clean:
	rm -rf $(VENV) src/*.egg-info build
