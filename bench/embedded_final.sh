#!/usr/bin/env bash
# The embedded default model alone, end to end on one GPU, with its evaluation:
#   pretrain recipes/embedded-pretrain.toml -> sft recipes/sft-embedded.toml -> dpo recipes/dpo-embedded.toml
#   -> packed HF folder -> WikiText-2 perplexity and zero-shot tasks (bitnet158 eval).
# Inputs: DATA (corpus shards with tokenizer/, from `bitnet158 data`), ../shared/data (SFT, preference,
# WikiText-2, eval sets; SDATA=folder links it there). Outputs under OUT: model.tar.part-* (the packed
# folder split in 15 MB parts) and results.tar.gz (logs, summaries, eval JSON).
#   DATA=data/gutenberg OUT=out bash bench/embedded_final.sh
set -u
T0=$(date +%s)
LIMIT=${LIMIT:-580}
DATA=${DATA:-data/gutenberg}; OUT=${OUT:-out}; WORK=${WORK:-/tmp/final}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if [ -n "${SDATA:-}" ] && [ ! -e ../shared/data ]; then mkdir -p ../shared && ln -s "$PWD/$SDATA" ../shared/data; fi
R=$WORK/results; mkdir -p "$R" "$OUT"
left() { echo $((LIMIT - ($(date +%s) - T0))); }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$R/gpu.txt"
s=$(date +%s)
python -m bitnet158.cli pretrain recipes/embedded-pretrain.toml --out "$WORK/pretrain" --device cuda \
  --set "data.sources.gutenberg=$PWD/$DATA" 2>&1 | grep -v "^step" | tee "$R/pretrain.log"
echo "pretrain_wall_s $(( $(date +%s) - s ))" | tee -a "$R/times.txt"
python -m bitnet158.cli export "$WORK/pretrain" "$WORK/pretrained-hf" --tokenizer "$DATA/tokenizer" | tee -a "$R/pretrain.log"
s=$(date +%s)
timeout $(( $(left) * 30 / 100 )) python -m bitnet158.cli sft recipes/sft-embedded.toml --init "$WORK/pretrain" \
  --out "$WORK/sft" --device cuda 2>&1 | grep -v "^step" | tee "$R/sft.log"
echo "sft_wall_s $(( $(date +%s) - s ))" | tee -a "$R/times.txt"
s=$(date +%s)
timeout $(( $(left) * 55 / 100 )) python -m bitnet158.cli dpo recipes/dpo-embedded.toml --init "$WORK/sft" \
  --out "$WORK/dpo" --device cuda 2>&1 | grep -v "^step" | tee "$R/dpo.log"
echo "dpo_wall_s $(( $(date +%s) - s ))" | tee -a "$R/times.txt"
FINAL=$WORK/dpo/hf; [ -d "$FINAL" ] || FINAL=$WORK/sft/hf
for m in "$FINAL" "$WORK/pretrained-hf"; do
  n=$(basename "$(dirname "$m")")-$(basename "$m")
  timeout 60 python -m bitnet158.cli eval ppl "$m" --data ../shared/data/wikitext-2/raw/wiki.test.raw --ctx 1024 \
    --device cuda --out "$R/ppl-$n.json" > "$R/ppl-$n.log" 2>&1
done
timeout $(( $(left) - 20 )) python -m bitnet158.cli eval tasks "$FINAL" --device cuda --out "$R/tasks.json" > "$R/tasks.log" 2>&1
for run in pretrain sft dpo; do
  for f in summary.json log.jsonl loss.png recipe.json; do [ -f "$WORK/$run/$f" ] && cp "$WORK/$run/$f" "$R/$run-$f"; done
done
(cd "$WORK" && tar czf "$OUT/results.tar.gz" results)
(cd "$(dirname "$FINAL")" && tar cf - "$(basename "$FINAL")") | split -b 15m - "$OUT/model.tar.part-"
tail -n 3 "$R"/*.log; cat "$R/times.txt"; ls -la "$OUT"; echo "total $(( $(date +%s) - T0 ))s"
