# Set-up on a fresh machine: `make demo` or `make test` (each creates .venv and installs first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: install demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/ulsam-deploy profile --paper
	$(BIN)/ulsam-deploy profile --arch mv2 --positions 13,14,16,17 --groups 4

# pytest exits 5 when it collects nothing; that is reported, not treated as a crash.
test: install
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
