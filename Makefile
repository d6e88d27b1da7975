# hostagent: the two commands a new user needs (run as root on Debian 12; on a bare image
# `bash deploy/bootstrap.sh demo|test` first installs make, gcc and Python, then runs these):
#   make demo   set up the local libvirt/QEMU lab and watch real resource_usage events
#   make test   install everything and run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LAB := $(PYTHON) deploy/lab/lab.py
LAB_GUESTS ?= 3
DEMO_DIR ?= demo-state
DEMO_PASSES ?= 6
DEMO_INTERVAL ?= 5
# pytest-xdist workers for the tests that need no lab (each starts its own servers on
# ephemeral ports); the lab tests share libvirtd and its guests, and the mock-clock tests
# (marked `alone` by tests/conftest.py) need an unloaded machine: both run one at a time.
TEST_WORKERS ?= 2

.PHONY: demo test dev deps venv lab-up lab-down lint unit lab-tests deploy-check bench clean

deps:                      ## apt packages: libvirt, QEMU, build deps (idempotent)
	$(LAB) install
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-dev; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: deps $(VENV)/.installed

dev: $(VENV)/.installed    ## the venv only: no root, no apt, no lab (enough for lint and unit)

lab-up: deps
	$(LAB) up $(LAB_GUESTS)

lab-down:
	$(LAB) down

demo: venv lab-up          ## lab + daemon: events appear in $(DEMO_DIR)/events.jsonl
	@mkdir -p $(DEMO_DIR)
	@sed -e "s|@STATE@|$(CURDIR)/$(DEMO_DIR)|g" -e "s|@INTERVAL@|$(DEMO_INTERVAL)|g" \
	  deploy/config/demo.toml.in > $(DEMO_DIR)/hostagent.toml
	@echo "== 1. check the config"
	@$(VENV)/bin/hostagent check-config $(DEMO_DIR)/hostagent.toml
	@echo; echo "== 2. one guest's counters, where each comes from, and the event it would yield"
	@$(VENV)/bin/hostagent --config $(DEMO_DIR)/hostagent.toml --log-format text dump halab-1
	@echo; echo "== 3. the daemon: $(if $(filter 0,$(DEMO_PASSES)),until Ctrl-C,$(DEMO_PASSES) passes) every $(DEMO_INTERVAL)s; events -> $(DEMO_DIR)/events.jsonl"
	@-$(VENV)/bin/hostagent --config $(DEMO_DIR)/hostagent.toml run $(if $(filter 0,$(DEMO_PASSES)),,--passes $(DEMO_PASSES))
	@echo; echo "== 4. the host as \`hostagent top\` sees it (live view: $(VENV)/bin/hostagent --config $(DEMO_DIR)/hostagent.toml top)"
	@$(VENV)/bin/hostagent --config $(DEMO_DIR)/hostagent.toml --log-format text top --once
	@echo; echo "== 5. the last events:"
	@tail -n $(LAB_GUESTS) $(DEMO_DIR)/events.jsonl | $(PY) -m json.tool --json-lines

lint: dev
	$(VENV)/bin/ruff check hostagent tests bench deploy
	$(VENV)/bin/mypy --strict hostagent

unit: dev
	$(VENV)/bin/pytest -m "not lab and not alone" -q -n $(TEST_WORKERS)
	$(VENV)/bin/pytest -m "alone and not lab" -q

lab-tests: venv lab-up
	HOSTAGENT_LAB=required $(VENV)/bin/pytest -m lab -q

deploy-check: venv
	bash deploy/ci/check_deploy.sh

test: venv lint lab-up     ## everything CI runs
	HOSTAGENT_LAB=required $(VENV)/bin/pytest -m "not lab and not alone" -q -n $(TEST_WORKERS)
	HOSTAGENT_LAB=required $(VENV)/bin/pytest -m "lab or alone" -q
	bash deploy/ci/check_deploy.sh

bench: venv lab-up         ## every benchmark; each prints its ratios (nothing asserted)
	$(PY) bench/pass_cost.py
	$(PY) bench/daemon_cost.py --live --domains 10,100,1000 --peers
	$(PY) bench/daemon_cost.py --domains 5000
	$(PY) bench/handoff_cost.py
	$(PY) bench/store_cost.py
	$(PY) bench/light_sample.py
	$(PY) bench/owner_lookup.py
	$(PY) bench/delivery.py
	$(PY) bench/nats.py
	$(PY) bench/thresholds.py
	$(PY) bench/api.py
	$(PY) bench/api.py --skip-latency --pin

clean:
	rm -rf $(VENV) $(DEMO_DIR) dist build *.egg-info
