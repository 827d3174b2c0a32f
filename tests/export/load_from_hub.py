"""Run by test_hub.py in a fresh process with HF_ENDPOINT pointing at the Hub stand-in: load what was published with
the cards' usage lines and save the logits (and the merged model's non-zeros) into the folder given as argument."""

import sys
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

import peft_seft  # noqa: F401  (registers SEFT; the card's first line)
from peft_seft.pruning import sparsity_report

folder = Path(sys.argv[1])
ids = torch.load(folder / "ids.pt")
adapter = AutoPeftModelForCausalLM.from_pretrained("me/tiny-seft").eval()
merged = AutoModelForCausalLM.from_pretrained("me/tiny-seft-merged").eval()
with torch.no_grad():
    logits = {"adapter": adapter(input_ids=ids).logits, "merged": merged(input_ids=ids).logits}
torch.save({**logits, "nonzeros": sparsity_report(merged).nonzeros}, folder / "logits.pt")
