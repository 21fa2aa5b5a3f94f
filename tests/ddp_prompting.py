"""Run by test_prompting.py on 2 CPU processes: fit PromptSRC (deep prompts + GPA), save each rank's prompts."""

import sys
from pathlib import Path

import lightning as L
import torch
from doubles import ddp_trainer, tiny_datamodule

from clipadapt.methods import PromptSRC

root, out = Path(sys.argv[1]), Path(sys.argv[2])
L.seed_everything(1)
data = tiny_datamodule(root, out)
model = PromptSRC(
    data.classnames,
    data.templates,
    arch="clipadapt-tiny",
    pretrained=None,
    gpa_mean=1.0,
    optimizer=lambda p: torch.optim.SGD(p, lr=1e-2),
)
torch.save(model.vl_prompts.state_dict(), out / "init.pt")
trainer = ddp_trainer(out, max_epochs=2)
trainer.fit(model, data)
torch.save(model.vl_prompts.state_dict(), out / f"rank{trainer.global_rank}.pt")
