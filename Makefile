# Set-up and the main jobs. `make demo` and `make test` work on a fresh clone of a CPU machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
COROM  := $(VENV)/bin/corom
MODEL  ?= all-minilm-l6-v2
# The CPU build of torch, installed *before* anything that depends on torch: an unpinned torch
# resolved from PyPI is a multi-GB CUDA build. (Elsewhere add --index-url https://download.pytorch.org/whl/cpu.)
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[cpu,export,openvino,serve,bulk,ray,bench,test]"
	touch $@

demo: setup
	$(COROM) export $(MODEL) --out models/build/$(MODEL) --force
	$(COROM) info --model models/build/$(MODEL)   # which variant `auto` picks on this machine, and why
	$(COROM) embed --model models/build/$(MODEL) --report "how long it take to get a master degree" | cut -c1-160
	$(COROM) score --model models/build/$(MODEL) \
	  --source "how long it take to get a master degree" \
	  "On average, students take about 18 to 24 months to complete a master degree." \
	  "On the other hand, some students prefer to go at a slower pace and choose to take" \
	  "several years to complete their studies." \
	  "It can take anywhere from two semesters"

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder   # two workers, files in conftest's order

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf models/build .pytest_cache
