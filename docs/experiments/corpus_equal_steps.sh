#!/bin/sh
# Issue 36's corpus comparison at equal steps: the shipped recipe's shape (recipes/gemma-3-270m-clt.yaml) trained
# for 150 steps of 1,024 tokens, without an activation cache, on Python's documentation and on the English mix;
# then each CLT evaluated on the other text's held-out split too (each run evaluates on its own). About 30 min a
# text on 2 cores. Run from the repository root in the venv `python3 -m nox -s train_real` makes
# (PATH=.nox/train_real/bin:$PATH), after building both texts:
#   python -m clt_hub.training.corpus real_out/corpus && python -m clt_hub.training.english real_out/english
# Results: real_out/eq/{docs,english}/eval.json, real_out/eq/{docs_on_english,english_on_docs}/eval.json.
set -e
for text in docs english; do
  if [ "$text" = docs ]; then data=real_out/corpus; else data=real_out/english; fi
  clt-hub train recipes/gemma-3-270m-clt.yaml --resume --set dataset=$data/train.jsonl \
    --set eval_dataset=$data/heldout.jsonl --set out_dir=real_out/eq/$text --set n_tokens=153600 \
    --set cache_dir=null --set cache_tokens=null --set eval_tokens=4096
done
clt-hub eval gemma-3-270m real_out/eq/docs/transcoder --dataset real_out/english/heldout.jsonl --n-tokens 4096 \
  --out real_out/eq/docs_on_english
clt-hub eval gemma-3-270m real_out/eq/english/transcoder --dataset real_out/corpus/heldout.jsonl --n-tokens 4096 \
  --out real_out/eq/english_on_docs
