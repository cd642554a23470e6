"""Run under torchrun by test_ddp.py: trains quickly, then records what each rank holds.

Writes rank<N>.json into the directory given as argv[1]: a digest of that rank's final
weights (parameters and BatchNorm buffers) and whether it called save_atomic.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

from serving.handler.artifact import CHECKPOINT_NAME
from training import train as train_module
from training.train import TrainConfig, train

report_dir, data_dir = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
saves = []
real_save = train_module.save_atomic


def recording_save(obj, path):
    saves.append(str(path))
    return real_save(obj, path)


train_module.save_atomic = recording_save
# gloo on the CPU, also on a machine with GPUs: that is what the test is about.
result = train(TrainConfig(quick=True, epochs=2, device="cpu", data_dir=data_dir, out=str(report_dir / CHECKPOINT_NAME)))
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
(report_dir / f"rank{rank}.json").write_text(json.dumps({
    "rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "weights": digest.hexdigest(),
    "saves": saves, "test_acc": result.metrics["test_acc"]}))
