"""`taskhead test` of a causal LM under FSDP2 on 2 CPU ranks (gloo), where rank 0 generates 2 tokens a sequence and
rank 1 generates 8: every decoding step all-gathers each decoder layer's weights, so the ranks must step together
(``synced_gpus``). Run by test_seq2seq.py as ``python fsdp_generate.py MODEL TEST_FILE WORK_DIR``; the last stdout
line is the test metrics as JSON."""

from __future__ import annotations

import json
import sys

import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from taskhead.tasks.seq2seq import Seq2SeqDataModule, Seq2SeqModule


class UnevenLengths(Seq2SeqModule):
    def on_test_start(self) -> None:
        n = 2 if self.global_rank == 0 else 8
        self.gen_config.max_new_tokens = self.gen_config.min_new_tokens = n  # exactly n decoding steps on this rank

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def main(model: str, test_file: str, work: str) -> None:
    module = UnevenLengths(model, architecture="causal", generation={"num_beams": 1, "max_new_tokens": 8})
    data = Seq2SeqDataModule(model_name_or_path=model, test_file=test_file, architecture="causal", eval_batch_size=1,
                             cache_dir=f"{work}/cache")
    # Lightning's FSDPStrategy (FSDP1) refuses CPU; ModelParallelStrategy with FSDP2's fully_shard runs on gloo
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        precision="32-true", use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=f"{work}/runs")
    metrics = trainer.test(module, data, verbose=False)[0]
    if trainer.is_global_zero:
        print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
