"""Worker for the distributed TPLA test: one process per shard (gloo), spawned by tests/test_tpla.py.

Every rank builds the same tiny DeepSeek-V3 (same seed), patches it with ``patch_tpla(distributed=True)``
so that it holds only its shard's weight slices and cache, and greedily generates. Rank ``i`` saves its
logits, tokens and cache bytes to ``out_dir/rank{i}.pt`` for the test to compare with the simulated run.
"""

from __future__ import annotations

import os

import torch


def run_rank(rank: int, world: int, init_file: str, out_dir: str, spec: dict) -> None:
    import torch.distributed as dist

    from conftest import tiny_model
    from kvcompress.patch import GENERATE_CACHE_KWARG
    from kvcompress.tpla import TPLACache, patch_tpla
    from test_tpla import prepare_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = prepare_model(tiny_model("deepseek_v3", seed=spec["seed"], **spec["overrides"]))
        with patch_tpla(model, num_shards=world, rotation=spec["rotation"], distributed=True):
            cache = TPLACache(model.config, num_shards=world, rotation=spec["rotation"], shard=rank)
            out = model.generate(spec["prompt"], attention_mask=spec["mask"], **{GENERATE_CACHE_KWARG: cache},
                                 max_new_tokens=spec["new_tokens"], do_sample=False, pad_token_id=0,
                                 eos_token_id=None, return_dict_in_generate=True, output_logits=True)
        torch.save({"sequences": out.sequences, "logits": torch.stack(out.logits), "nbytes": cache.nbytes(),
                    "shard_nbytes": cache.shard_nbytes(rank), "expected": cache.expected_shard_nbytes(),
                    "latent_width": cache.layers[0].keys.shape[-1], "held": cache.layers[0].keys.shape[1]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
