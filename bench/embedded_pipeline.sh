#!/usr/bin/env bash
# The embedded default model end to end on one GPU, with the training study alongside:
#   bench/train_study.py (4 pretraining runs at once; the ternary two-stage one is the embedded model)
#   -> bitnet158 sft recipes/sft-embedded.toml -> bitnet158 dpo recipes/dpo-embedded.toml -> packed HF folder.
# Inputs: DATA (shards of the corpus with tokenizer/, from `bitnet158 data`), ../shared/data (SFT and
# preference sets). Outputs under OUT: results/ (study JSON, plot, driver log), runs.tar.gz (logs,
# summaries), pretrained.tar.part-* and model.tar.part-* (packed folders split in 15 MB parts).
#   DATA=data/gutenberg OUT=out bash bench/embedded_pipeline.sh        # STEPS=1230 updates per run
set -u
T0=$(date +%s)
LIMIT=${LIMIT:-585}
DATA=${DATA:-data/gutenberg}; OUT=${OUT:-out}; WORK=${WORK:-/tmp/study}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ -n "${SDATA:-}" ] && [ ! -e ../shared/data ]; then mkdir -p ../shared && ln -s "$PWD/$SDATA" ../shared/data; fi
mkdir -p "$OUT/results"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/results/gpu.txt"
python bench/train_study.py --data "$DATA" --work "$WORK" --out "$OUT/results" --seeds 0 --steps "${STEPS:-1230}" \
  --arms ternary_two_stage,ternary_one_stage,fp_two_stage_lr5e-4,fp_one_stage_lr1.5e-3 --name train_study \
  --probe-steps 12 --deadline-s $((LIMIT - 170)) 2>&1 | tee "$OUT/results/study.log"
ln -sfn "$WORK/ternary_two_stage_s0" "$WORK/ternary_two_stage"   # the embedded model's pretraining run
python -m bitnet158.cli export "$WORK/ternary_two_stage" "$WORK/model" --tokenizer "$DATA/tokenizer"
pack() {  # pack FOLDER NAME: tar split in 15 MB parts under OUT
  (cd "$(dirname "$1")" && tar cf - "$(basename "$1")") | split -b 15m - "$OUT/$2.tar.part-"
}
[ -d "$WORK/model" ] && pack "$WORK/model" pretrained
left() { echo $((LIMIT - ($(date +%s) - T0))); }
echo "after pretraining: $(left)s left"
if [ -d "$WORK/ternary_two_stage/checkpoints" ] && [ "$(left)" -gt 90 ]; then
  timeout $(( $(left) * 45 / 100 )) python -m bitnet158.cli sft recipes/sft-embedded.toml --init "$WORK/ternary_two_stage" \
    --out "$WORK/sft" --device cuda 2>&1 | tail -n 40 | tee "$OUT/results/sft.log"
  if [ -d "$WORK/sft/checkpoints" ] && [ "$(left)" -gt 40 ]; then
    timeout $(( $(left) - 25 )) python -m bitnet158.cli dpo recipes/dpo-embedded.toml --init "$WORK/sft" \
      --out "$WORK/dpo" --device cuda 2>&1 | tail -n 40 | tee "$OUT/results/dpo.log"
  fi
fi
for run in sft dpo; do [ -f "$WORK/$run/summary.json" ] && cp "$WORK/$run/summary.json" "$WORK/${run}_summary.json"; done
(cd "$WORK" && tar czf "$OUT/runs.tar.gz" --exclude='*/checkpoints' --exclude='*/hf' --exclude=model \
   --exclude='*/tb' ternary_* fp_* probe_* *.log sft dpo *_summary.json 2>/dev/null)
if [ -d "$WORK/dpo/hf" ]; then pack "$WORK/dpo/hf" model; elif [ -d "$WORK/sft/hf" ]; then pack "$WORK/sft/hf" sft-model; fi
ls -la "$OUT" "$OUT/results"; echo "total $(( $(date +%s) - T0 ))s"
