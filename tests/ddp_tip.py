"""Run by test_adapters.py on 2 CPU processes: training-free Tip-Adapter whose ranks would draw different views."""

import os
import sys
from pathlib import Path

import lightning as L
import torch
from doubles import ddp_trainer, tiny_datamodule

from clipadapt.methods import TipAdapter

root, out = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in rank 1 only
# Different augmentations per rank: one cache on both ranks only if it is module state that Lightning syncs.
L.seed_everything(1 + rank)
data = tiny_datamodule(root, out)
model = TipAdapter(classnames=data.classnames, templates=data.templates, arch="clipadapt-tiny", pretrained=None)
trainer = ddp_trainer(out)
trainer.test(model, data)
local = model._encode_split(data.train_dataloader(), normalize=False)[0]  # this rank's own views
torch.save({"keys": model.cache_keys.detach(), "alpha": model.alpha, "local": local}, out / f"rank{rank}.pt")
