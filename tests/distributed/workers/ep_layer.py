"""Worker: SparseMoE with experts sharded over an EP group ≡ the same layer on one process.

Run with `python -m torch.distributed.run --nproc_per_node=N ep_layer.py EP TOPK`. Every rank builds
the full layer from one seed, computes the single-process reference on the global batch, then runs
its shard of the batch through the expert-parallel layer and checks outputs and every gradient.
"""

import sys

import torch
import torch.distributed as dist

from hf_moe_mt.moe import SparseMoE
from hf_moe_mt.parallel import (create_expert_parallel_groups, gather_full_state_dict, global_grad_norm,
                                is_expert_parameter, parallelize_experts, reduce_expert_gradients)


def main(ep_size: int, top_k: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    layer = SparseMoE(16, 32, num_experts=8, top_k=top_k, drop_tokens=False, activation="gelu")
    batch = torch.randn(world * 3, 5, 16)  # identical on every rank; rank r takes rows [3r, 3r+3)
    # Reference: one process, all experts, global batch, loss = mean over everything.
    reference = SparseMoE(16, 32, num_experts=8, top_k=top_k, drop_tokens=False, activation="gelu")
    reference.load_state_dict(layer.state_dict())
    ref_out, _ = reference(batch)
    ref_out.square().mean().backward()
    ref_grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in reference.parameters())).float()

    groups = create_expert_parallel_groups(ep_size)
    parallelize_experts(layer, groups)
    local = batch[3 * rank: 3 * rank + 3]
    out, info = layer(local)
    torch.testing.assert_close(out, ref_out[3 * rank: 3 * rank + 3], rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    # Shared params: what DDP does (average over world). Experts: our reduction.
    for param in layer.parameters():
        if not is_expert_parameter(param):
            dist.all_reduce(param.grad)
            param.grad.div_(world)
    reduce_expert_gradients(layer, groups)
    torch.testing.assert_close(global_grad_norm(layer, groups), ref_grad_norm, rtol=1e-5, atol=1e-7)

    full_grads = {}
    for name, param in layer.named_parameters():
        grad = param.grad
        if is_expert_parameter(param):
            parts = [torch.empty_like(grad) for _ in range(ep_size)]
            dist.all_gather(parts, grad, group=groups.ep_group)
            grad = torch.cat(parts)
        full_grads[name] = grad
    for name, param in reference.named_parameters():
        torch.testing.assert_close(full_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=f"grad of {name}")
    gathered = gather_full_state_dict(layer, groups)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(gathered[name], tensor), name
    dist.barrier()
    if rank == 0:
        print(f"OK ep={ep_size} world={world} top_k={top_k}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
