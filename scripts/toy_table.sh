#!/usr/bin/env bash
# The toy-world table of the issues' notes: every method adapts the pretrained toy CLIP to toy_dusk
# (base classes, 16 shots, seeds 1-3) through the real CLI (`clipadapt sweep`), tested on base, novel and
# the pretraining domain `toy` (forgetting); then one `clipadapt report --compare`.
#   bash scripts/toy_table.sh [OUT]            (default OUT: runs/toy; ~1 h on one CPU core)
# Each method's config + configs/toy.yaml + the short toy recipe of the behaviour tests (10 epochs at a
# raised learning rate; tests/test_behaviour*.py): behaviour, not the papers' numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/toy}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
sweep() {  # sweep CONFIG [FLAGS...]
  local config=$1; shift
  clipadapt sweep --config "configs/$config.yaml" --config configs/toy.yaml --datasets toy_dusk --shots 16 \
    --seeds 1 2 3 --out "$OUT" "$@"
}
lr=--model.init_args.optimizer.init_args.lr
ctx=(--model.init_args.n_ctx 4 --model.init_args.context_init "a photo of a")

sweep zeroshot --command test
sweep linear_probe_fewshot "$lr" 1e-2
sweep ast_base2novel "$lr" 5e-4 --model.init_args.probe_lr 1e-3 --model.init_args.top_k 6 --model.init_args.prompts simple
adamw() { echo "{\"class_path\": \"torch.optim.AdamW\", \"init_args\": {\"lr\": $1}}"; }
sweep adapt_fewshot --model.init_args.optimizer "$(adamw 2e-3)" --model.init_args.target_length 28 \
  --model.init_args.prune_per_step 6 --model.init_args.accumulate_steps 4 --model.init_args.prune_after_epochs 2
sweep rada_base2novel --model.init_args.optimizer "$(adamw 3e-2)"
sweep cite_base2novel "$lr" 3e-4
sweep coop_fewshot "${ctx[@]}" "$lr" 0.05
sweep kgcoop_base2novel "${ctx[@]}" "$lr" 0.05
sweep cocoop_base2novel "$lr" 0.05
sweep maple_base2novel --model.init_args.prompt_depth 3 "$lr" 0.05
sweep promptsrc_base2novel --model.init_args.text_depth 3 --model.init_args.image_depth 3 --model.init_args.gpa_mean 7.5 "$lr" 0.01
sweep clip_adapter_fewshot --model.init_args.residual_ratio 0.2 "$lr" 0.1
sweep tip_adapter_fewshot --command test
sweep tip_adapter_f_fewshot "$lr" 1e-3
sweep clip_lora_fewshot "$lr" 2e-3
sweep ft_imagenet_ood "$lr" 1e-4
sweep wiseft_imagenet_ood "$lr" 1e-4 --model.init_args.wise_alpha 0.5
sweep lpft_imagenet_ood --model.init_args.probe_epochs 3 --model.init_args.probe_lr 1e-3 --model.init_args.finetune_lr 1e-4
sweep tpt_finegrained --command test

clipadapt report "$OUT" --compare zeroshotclip linearprobe clipast adapt rada clipcite coop kgcoop cocoop maple \
  promptsrc clipadapter tipadapter tipadapterf cliplora ft wiseft lpft tpt
