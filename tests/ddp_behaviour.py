"""Run by test_behaviour.py on 2 CPU processes: the linear probe of `linear_probe` under DDP, its accuracies as json.

Each rank takes 16 images a step, so a step sees 32 images as on one process (the same lr and schedule).
"""

import json
import os
import sys
from pathlib import Path

from behaviour import fit_toy

from clipadapt.methods import LinearProbe

root, out, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ddp = dict(devices=2, strategy="ddp")
accs = fit_toy(LinearProbe, root, seed=seed, lr=1e-2, data=dict(batch_size=16), trainer=ddp)
if os.environ.get("LOCAL_RANK", "0") == "0":
    out.write_text(json.dumps(accs))
