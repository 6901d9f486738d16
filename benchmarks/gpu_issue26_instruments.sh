#!/usr/bin/env bash
# Issue 26 on Instruments (instruments_cpu recipe) on one borrowed GPU box, 3 seeds at once, inside one deadline.
#
# Prepared here (CPU), carried in .gpu_carry/ (git-ignored):
#   .gpu_carry/instruments-lcrec/    the LC-Rec release (../shared/data does not travel)
#   .gpu_carry/s<seed>/              `kedro run --env instruments_cpu --pipelines data_prep,tokenization
#                                    --params seed=<seed>`'s data root, less 04_feature (only tokenization reads it)
#   .whl/                            transformers/peft/huggingface_hub as this project pins them (the box has older)
# Per seed, three processes share the GPU (the 0.85M-param LM leaves it mostly idle): the CE SFT model with the
# align3gr_cf hybrid (`sft_cf`), TCA4Rec everywhere at alpha 0.1 then 0.3, and its uniform-label control at 0.1
# then 0.3. A row whose SFT would start after DEADLINE s is skipped; every process is stopped at HARD s.
# Results: $OUT/study.tgz = results/<row>/seed<N>/{metrics,per_case}.parquet (read by study_pooled.py), one JSON
# report and one log per process.
set -u
OUT=${OUT:-/tmp/gpu_issue26_out}
DEADLINE=${DEADLINE:-230}
HARD=${HARD:-520}
SEEDS=${SEEDS:-"42 43 44"}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1  # nine processes on 16 cores
python3 -c "import torch, transformers, peft; print(torch.__version__, torch.cuda.get_device_name(0), transformers.__version__, peft.__version__)" || exit 1
mkdir -p ../shared/data && cp -r .gpu_carry/instruments-lcrec ../shared/data/
STUDY=/tmp/study_gpu && mkdir -p "$STUDY"
COMMON=(--env instruments_cpu --cached-stages data_prep,tokenization --results-dir "$STUDY" --deadline "$DEADLINE"
        --set evaluation.max_users.valid=2000 --set evaluation.show_progress=false
        --set tokenization.device=auto --set sft_train.trainer.bf16=false --set sft_train.trainer.torch_threads=1
        --set sft_train.trainer.progress_bar=false --set sft_train.trainer.logging_steps=200)
start() {  # seed, name, rows, extra args...
  local seed=$1 name=$2 rows=$3; shift 3
  timeout -k 5 "$HARD" python3 benchmarks/gpu_study.py "${COMMON[@]}" --deadline-scope row --seed "$seed" --data-root ".gpu_carry/s$seed" \
    --rows "$rows" --out "$STUDY/report_${name}_s$seed.json" "$@" > "$STUDY/log_${name}_s$seed.txt" 2>&1 &
}
for s in $SEEDS; do
  start "$s" cf sft_cf --set evaluation.align3gr_cf.batch_size=64
  start "$s" tca tca_all_a01,tca_all --set evaluation.align3gr_cf.enabled=false
  start "$s" uni tca_uniform_a01,tca_uniform --set evaluation.align3gr_cf.enabled=false
done
while [ -n "$(jobs -r)" ]; do sleep 20; echo "[$(date +%T)] running: $(jobs -r | wc -l); done: $(find "$STUDY/results" -name metrics.parquet 2>/dev/null | wc -l)"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; done
wait
tar -czf "$OUT/study.tgz" -C "$STUDY" .
find "$STUDY/results" -name metrics.parquet | sort
tail -n 3 "$STUDY"/log_*.txt
