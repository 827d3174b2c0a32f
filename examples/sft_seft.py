# Copyright 2026 The peft-seft authors. Apache-2.0.
"""
TRL's SFT script (`trl/scripts/sft.py`) with a SEFT adapter instead of LoRA: repair a pruned model on a chat
dataset and keep its sparsity exactly.

```bash
pip install "peft-seft[cli]"
python examples/sft_seft.py \
    --model_name_or_path me/SmolLM2-135M-Instruct-wanda50 \
    --dataset_name trl-lib/Capybara \
    --learning_rate 2.0e-3 \
    --max_steps 1000 \
    --packing \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --seft_density 0.01 \
    --output_dir SmolLM2-135M-wanda50-SEFT \
    --push_to_hub --hub_model_id me/SmolLM2-135M-wanda50-SEFT \
    --seft_merged_repo me/SmolLM2-135M-wanda50-SEFT-merged
```

Every `SFTConfig`, `ModelConfig` and `ScriptArguments` option of TRL's script works (also from a `--config`
YAML file); the SEFT options are the `--seft_*` flags of `peft_seft.trl_args.SEFTArguments`. Chat
(`messages`) and prompt/completion datasets go through SFTTrainer's own processing (chat template,
completion-only loss, packing).

`--push_to_hub` publishes through `peft_seft.hub` instead of `trainer.push_to_hub()` (which would replace the
SEFT card with TRL's and name a local base): the adapter's `base_model` is `--model_name_or_path` when that is a
Hub id, or `--seft_base_repo`, where a local pruned model is published first.
"""

import peft_seft  # noqa: F401  (registers SEFT with PEFT before any PEFT call)
from peft_seft import SEFTCallback
from peft_seft.hub import require_repo_id
from peft_seft.publish import publish
from peft_seft.trl_args import SEFTArguments, get_seft_config


def main(script_args, training_args, model_args, seft_args):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    push = training_args.push_to_hub
    if push:  # refuse before training what the Hub would refuse after it
        require_repo_id(training_args.hub_model_id, "--hub_model_id", "pass the adapter's Hub repo, owner/name.")
        require_repo_id(
            seft_args.seft_base_repo or model_args.model_name_or_path,
            "adapter's base model",
            "pass --seft_base_repo owner/name to publish the local pruned model as well.",
        )
    training_args.push_to_hub = False  # published below, with the SEFT card, instead of by the Trainer

    model_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_seft_config(seft_args),
        callbacks=[SEFTCallback()],
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("✅ Training completed.")

    trainer.save_model(training_args.output_dir)  # the adapter with its SEFT model card
    trainer.accelerator.print(f"💾 SEFT adapter saved to {training_args.output_dir}.")

    if push and trainer.accelerator.is_main_process:
        pruned = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
        lines = publish(
            pruned,
            lambda _: trainer.model,
            tokenizer,
            base_repo=seft_args.seft_base_repo,
            adapter_repo=training_args.hub_model_id,
            merged_repo=seft_args.seft_merged_repo,
            pattern=seft_args.seft_pattern,
            token=training_args.hub_token,
            private=training_args.hub_private_repo,
            revision=training_args.hub_revision,
        )
        for line in lines:
            trainer.accelerator.print(f"🤗 {line}")


def make_parser():
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    return TrlParser((ScriptArguments, SFTConfig, ModelConfig, SEFTArguments))


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, seft_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args, seft_args)
