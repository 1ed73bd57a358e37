"""The learner's forward module under torch's own FSDP2 (``fully_shard`` per decoder layer and
at the root = the wrapper, as a sharded strategy wraps it): the chunked head reads the root's
gathered ``lm_head`` inside the wrapper's forward, and the gradients are those of the unsharded
full-logits pass. Two ranks over gloo; the fsdp2 strategy itself lives elsewhere."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM

from services.learner_forward import PolicyLogprobs
from services.ports import free_port

CASES = [(False, None, 1e-6), (True, None, 1e-6), (True, torch.bfloat16, 3e-2)]


def build():
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)).eval()


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (4, 12), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, 10:] = 0
    ids[0, :5] = ids[2, :5]  # rows 0 and 2 share a prompt (each rank packs its own)
    response = torch.zeros_like(ids)
    response[:, 5:] = attention[:, 5:]
    return ids, attention, response


def worker(rank, port, out):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ids, attention, response = batch()
        for index, (shared, param_dtype, _) in enumerate(CASES):
            model = build()
            policy = PolicyLogprobs(model, temperature=0.7, chunk_tokens=5, shared_prompt=shared)
            precision = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
            for layer in model.model.layers:
                fully_shard(layer, mp_policy=precision)
            fully_shard(policy, mp_policy=precision)
            mine = slice(rank, None, 2)
            logprobs, _ = policy(ids[mine], attention[mine], response[mine])
            (logprobs * response[mine]).sum().backward()
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
            if rank == 0:
                save_file(grads, os.path.join(out, f"{index}.safetensors"))
            del policy, model
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_chunked_forward_under_fully_shard_gives_the_unsharded_gradients(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ids, attention, response = batch()
    for index, (shared, _, tolerance) in enumerate(CASES):
        model = build()
        reference = PolicyLogprobs(model, temperature=0.7, shared_prompt=shared)
        logprobs, _ = reference(ids, attention, response)
        ((logprobs * response).sum() / 2).backward()  # FSDP averages over the 2 ranks
        sharded = load_file(str(tmp_path / f"{index}.safetensors"))
        assert sharded.keys() == dict(model.named_parameters()).keys()  # plain HF names
        for name, param in model.named_parameters():
            scale = max(1.0, param.grad.abs().max().item())
            assert (sharded[name] - param.grad).abs().max() <= tolerance * scale, (index, name)
