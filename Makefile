# Every target creates .venv on first use and installs what it needs.
# torch==2.13.0 is installed first: that pin takes the local CPU build here
# (the package itself only asks for torch>=2.4).
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test test-oldest test-long screenshots bench bench-s3 bench-dedup bench-dist \
	bench-gpu bench-memory bench-scale clean

.venv/.installed: pyproject.toml
	test -d .venv || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all,dev]"
	touch $@

demo: .venv/.installed
	.venv/bin/ckpts demo

# The report test renders HTML in headless Chromium (CI runs as root on Debian).
test: .venv/.installed
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	.venv/bin/ruff check src tests benchmarks examples
	.venv/bin/mypy
	.venv/bin/pytest -q

# The oldest framework releases the extras allow, in a venv of their own: CI runs the
# integration tests on them too (`make test` has the newest).
OLDEST := "transformers==4.57.6" "pytorch-lightning==2.6.0" "lightning==2.6.0"
.venv-oldest/.installed: pyproject.toml
	test -d .venv-oldest || python3 -m venv .venv-oldest
	.venv-oldest/bin/pip install -q --upgrade pip
	.venv-oldest/bin/pip install -q torch==2.13.0
	.venv-oldest/bin/pip install -q -e ".[hf,lightning]" $(OLDEST) "pytest>=8" "pytest-timeout>=2.3"
	touch $@

test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/pytest -q -p no:cacheprovider tests/test_hf_trainer.py \
		tests/test_lightning.py tests/test_import.py tests/test_import_lightning.py \
		tests/test_examples.py

# Opt-in long mode: 200 SIGKILL trials (sync + async), 2,000 fuzz examples per target and
# 2,000 codec round-trip examples per property.
test-long: .venv/.installed
	CKPTS_LONG=1 .venv/bin/pytest -q -p no:cacheprovider tests/test_kill_harness.py tests/test_fuzz.py \
		tests/test_codec_property.py

# The README's pictures: trains the demo model (seconds), then `ckpts plot` and a
# Chromium screenshot of `ckpts report`.
screenshots: .venv/.installed
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	$(PY) docs/screenshots.py docs/img

bench: .venv/.installed
	$(PY) -m benchmarks.run

# The S3 path against s3fs, on a moto server it starts on loopback (no network, no AWS).
bench-s3: .venv/.installed
	$(PY) -m benchmarks.s3_bench

# The memory tier (memory=Every(1), save=Every(5)): save()'s blocking time per step against
# the copy floor, on a local run and on a moto S3 server it starts on loopback, then the
# goodput of 0.3 s training steps against no checkpointing (~6 minutes, ~3 GB of /dev/shm).
bench-memory: .venv/.installed
	$(PY) -m benchmarks.memory_bench

# Issue 11: a LoRA run (frozen base) and a full fine-tune, saved with and without reuse of
# unchanged tensor files, in lockstep; checks the targets (a few minutes, ~5 GB of disk).
bench-dedup: .venv/.installed
	$(PY) -m benchmarks.dedup_bench

# Issue 10: FSDP2 saves at 2 and 4 CPU ranks and resharding restores (2 -> 4, 4 -> 2),
# ckpts against torch.distributed.checkpoint in interleaved rounds (~4 minutes, ~2 GB disk).
bench-dist: .venv/.installed
	$(PY) -m benchmarks.dist_bench

# Issue 14: ~268 M fp32 params + AdamW on CUDA against torch.save/torch.load/DCP and the
# pinned-copy and disk floors, and 40 training steps saving every 10 (<= 5 minutes on one
# H200). It runs under python3 where that holds torch (on a GPU machine, its CUDA build;
# the .venv's is CPU-only), else under the .venv; without a CUDA device it prints why and
# exits 0. `python -m benchmarks.gpu --help` lists its options (--size, --cpu-dry-run, ...).
GPU_PYTHON ?= $(shell python3 -c 'import torch' 2>/dev/null && echo python3 || echo $(PY))
bench-gpu:
	test "$(GPU_PYTHON)" != "$(PY)" || $(MAKE) .venv/.installed
	PYTHONPATH=src $(GPU_PYTHON) -m benchmarks.gpu

# Issue 26: format v4's planning and metadata for a simulated FSDP2 job of 8, 64, 512 and
# 2,816 ranks (Llama-7B shapes + AdamW, shapes only, no data, one process): a rank's save
# plan and index, rank 0's commit and manifest, and a rank's restore plan onto twice the
# ranks, against the issue's targets (docs/scale.md; a few minutes on 2 cores).
bench-scale: .venv/.installed
	for n in 8 64 512 2816; do $(PY) -m benchmarks.scale_sim --ranks $$n --json || exit 1; done

clean:
	rm -rf .venv .venv-oldest .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
