"""One DDP training step of a tiny MoE model on 2 CPU processes (gloo), launched by test_model.py.

Each rank feeds two tokens and routes top-1 of 8 experts, so experts without tokens are certain.
DDP must neither fail on them (they stay in the graph) nor leave gradients out of sync.
Writes `rank{r}.txt`: rank, gradient checksum, fewest experts idle on both ranks in any step (layer 0).
"""
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, use_moe=True, n_routed_experts=8, num_experts_per_tok=1)
model = DistributedDataParallel(MiniMindForCausalLM(config))  # find_unused_parameters=False on purpose
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

used = torch.zeros(8)


def record_routing(gate, inputs, out):
    used.index_fill_(0, out[0].view(-1), 1.0)


model.module.model.layers[0].mlp.gate.register_forward_hook(record_routing)
ids = torch.tensor([[17 + 101 * rank, 5]])  # the first position predicts the second
idle_per_step = []
for step in range(3):  # later steps prove the earlier ones left DDP in a consistent state
    used.zero_()
    out = model(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    dist.all_reduce(used)
    idle_per_step.append(int((used == 0).sum()))
    if step < 2:
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
checksum = sum(p.grad.double().abs().sum().item() for p in model.parameters())
idle = min(idle_per_step)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{rank} {checksum:.10e} {idle}\n")
dist.destroy_process_group()
