#!/bin/bash
# Peak RSS, prefill time and decode ms/step of `llmkern generate` for two trees (built in place), alternating:
# /work/main (this tree) and /tmp/base (`git archive REV | tar -x -C /tmp/base` + build_ext --inplace), on the
# default model and the llama.cpp-made files of docs/notes/gguf-kquants/quant.py in /tmp/kq.
cd /tmp
for round in 1 2; do
for f in "" /tmp/kq/smollm2-Q4_K_M.gguf /tmp/kq/smollm2-Q8_0.gguf; do
  for dt in float32 bfloat16; do
    for tree in /work/main /tmp/base; do
      m=${f:+--model $f}
      out=$(PYTHONPATH=$tree OMP_NUM_THREADS=2 /usr/bin/time -v /work/venv/bin/python -m llmkern generate --no-bandwidth --dtype $dt $m --max-new-tokens 48 "What is the capital of France?" 2>&1)
      rss=$(echo "$out" | grep "Maximum resident" | awk '{print $6/1000}')
      step=$(echo "$out" | grep -o "[0-9.]* ms/step")
      pre=$(echo "$out" | grep -o "prefill [0-9]* tok in [0-9]* ms")
      echo "$round ${f:-default} $dt $tree rss=${rss}MB $step | $pre"
    done
  done
done
done
