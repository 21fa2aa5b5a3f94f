"""Run by test_ddp.py on 2 CPU processes: fit the two-stage double, save each rank's weights."""

import sys
from pathlib import Path

import lightning as L
import torch
from doubles import TwoStage, ddp_trainer, tiny_datamodule

root, out = Path(sys.argv[1]), Path(sys.argv[2])
L.seed_everything(1)
data = tiny_datamodule(root, out)
model = TwoStage(
    classnames=data.classnames,
    templates=data.templates,
    arch="clipadapt-tiny",
    pretrained=None,
    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
)
torch.save(model.state_dict(), out / "init.pt")
trainer = ddp_trainer(out, max_epochs=2)
trainer.fit(model, data)
torch.save(model.state_dict(), out / f"rank{trainer.global_rank}.pt")
