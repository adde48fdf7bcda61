#!/usr/bin/env bash
# One GPU session's checks, in one command that fits a 10-minute device call (no Hub there):
#   1. speed: benchmarks/speed.py on a BERT-base-sized model (random weights), bf16-mixed and fp32,
#      ours against the HF Trainer, GPU otherwise idle; then train.py's whole 3-epoch run in bf16;
#   2. the test suite on CUDA, beside
#   3. a quality sweep of MiniLM-L6 recipes (ours and the HF Trainer, 3 seeds each, fp32), several runs
#      at a time: small models leave most of a large GPU idle.
# Inputs the device machine cannot download travel with the tree, prepared here (see README, "GPU check"):
#   .carry/cola/{train,dev}.tsv, .carry/minilm/ (MiniLM-L6 with fp16 weights: half the size to carry;
#   widened back to fp32 below), .whl/*.whl (datasets and its small dependencies, transformers).
# Results go to $OUT (default ./gpu_out): speed_*.json, sweep.jsonl, pytest.log, gpu_check.log.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - start )) s] $*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, pytorch_lightning, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', pytorch_lightning.__version__, 'datasets', datasets.__version__)" || exit 1

python3 - <<'EOF' || exit 1
import shutil
from safetensors.torch import load_file, save_file
shutil.copytree(".carry/minilm", "/tmp/minilm", dirs_exist_ok=True)
weights = load_file(".carry/minilm/model.safetensors")
save_file({k: v.float() for k, v in weights.items()}, "/tmp/minilm/model.safetensors", metadata={"format": "pt"})
EOF
DATA=.carry/cola
python3 benchmarks/speed.py --make_bert_base /tmp/bert-base --vocab_from /tmp/minilm || exit 1
elapsed "prepared"

# 1. Speed, nothing else on the GPU.
for precision in bf16-mixed 32-true; do
    timeout 150 python3 benchmarks/speed.py --model /tmp/bert-base --data_dir $DATA --precision $precision \
        --rows ours,hf_grouped,hf_pad128 --no_inference --json "$OUT/speed_$precision.json" | grep -v Warning
    elapsed "speed $precision done"
done
timeout 90 python3 train.py --model.model_name_or_path /tmp/bert-base --data.data_dir $DATA \
    --trainer.logger.init_args.save_dir /tmp/logs --trainer.enable_progress_bar false 2>&1 | grep -E "Best|train_samples|error" 
cp /tmp/logs/cola/version_0/metrics.json "$OUT/bert_base_3_epochs_bf16.json" 2>/dev/null
elapsed "3 epochs bf16 done"

# 2. The test suite on CUDA, in the background.
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1 &
tests=$!

# 3. Quality sweep: one line per (recipe, seed), most important first; whatever finishes before the
#    deadline is in sweep.jsonl. Sweep runs keep only a weights-only best checkpoint (disk and time).
export OMP_NUM_THREADS=1
ours="--model.model_name_or_path /tmp/minilm --data.data_dir $DATA --trainer.precision 32-true --trainer.enable_progress_bar false --checkpoint.save_last false --checkpoint.save_weights_only true --save_last_every_minutes null --trainer.logger.init_args.save_dir /tmp/logs"
hf="--model /tmp/minilm --data_dir $DATA"
jobs=()
for seed in 1 2 3; do
    for recipe in "--learning_rate 1e-4 --epochs 3" "--learning_rate 5e-5 --epochs 3" "--learning_rate 2e-5 --epochs 3" \
                  "--learning_rate 1e-4 --epochs 8" "--learning_rate 5e-5 --epochs 8" "--learning_rate 2e-5 --epochs 8"; do
        jobs+=("--runner hf --seeds $seed --label 'hf $recipe' -- $hf $recipe")
    done
    for recipe in "--model.learning_rate 1e-4 --trainer.max_epochs 3" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.head_learning_rate 1e-3" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.layer_decay 0.9" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.reinit_layers 1" \
                  "--model.learning_rate 2e-4 --trainer.max_epochs 6" \
                  "--model.learning_rate 2e-4 --trainer.max_epochs 6 --model.layer_decay 0.8 --model.head_learning_rate 1e-3" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.warmup_ratio 0.2" \
                  "--model.learning_rate 2e-5 --trainer.max_epochs 3"; do
        jobs+=("--seeds $seed --label 'ours $recipe' -- $ours $recipe")
    done
done
deadline=$(( $(date +%s) + 330 ))  # no run starts with under a minute left; each is killed at the deadline
printf '%s\n' "${jobs[@]}" | xargs -d '\n' -P 14 -I{} sh -c "left=\$(( $deadline - \$(date +%s) )); [ \$left -gt 60 ] || exit 0; timeout \$left python3 benchmarks/quality.py --json $OUT/sweep.jsonl {} > /dev/null 2>>$OUT/sweep_errors.log"
elapsed "sweep stopped: $(wc -l < "$OUT/sweep.jsonl") of ${#jobs[@]} runs"
wait $tests; echo "pytest exit $?"; tail -3 "$OUT/pytest.log"
elapsed "done"
