"""Run by test_ddp.py on 2 CPU processes: fit the two-stage double, save each rank's weights."""

import sys
from pathlib import Path

import lightning as L
import torch
from doubles import TwoStage

from clipadapt.data import CLIPDataModule

root, out = Path(sys.argv[1]), Path(sys.argv[2])
L.seed_everything(1)
data = CLIPDataModule(
    root=str(root), dataset="oxford_pets", num_shots=4, image_size=32, batch_size=4, num_workers=0, cache_dir=str(out)
)
model = TwoStage(
    classnames=data.classnames,
    templates=data.templates,
    arch="clipadapt-tiny",
    pretrained=None,
    optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
)
torch.save(model.state_dict(), out / "init.pt")
trainer = L.Trainer(
    accelerator="cpu",
    devices=2,
    strategy="ddp",
    max_epochs=2,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    default_root_dir=out,
)
trainer.fit(model, data)
torch.save(model.state_dict(), out / f"rank{trainer.global_rank}.pt")
