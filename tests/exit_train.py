"""A plain PyTorch training script, written the way PyTorch's distributed tutorials write one, sharded with MiCS.

    torchrun --standalone --nproc_per_node 4 tests/exit_train.py MODE PARTITION_SIZE [SCOPE]

MODE says how the script ends: `barrier_destroy` (dist.barrier(); dist.destroy_process_group()), `destroy`
(dist.destroy_process_group() alone) or `nothing` (no teardown at all). Every one of them must exit 0: the
library may not change how a user's script has to end. SCOPE `module` keeps the model and optimizer alive in a
module global until the interpreter finalises (a script written without a main()); `main` (the default) lets
them go when main() returns. Only torch is imported, to keep a launch short.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn as nn

import mics_hf


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


KEEP: list = []


def main() -> None:
    mode, partition_size = sys.argv[1], int(sys.argv[2])
    scope = sys.argv[3] if len(sys.argv) > 3 else "main"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = mics_hf.shard_model(Net(), mics_hf.MiCSConfig(partition_size=partition_size, devices_per_node=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    for step in range(3):
        for micro in range(2):
            x = torch.randn(8, 16, generator=g)
            with model.no_sync() if micro == 0 else torch.enable_grad():
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"rank {rank} loss {loss.item():.4f}", flush=True)
    if scope == "module":
        KEEP.extend([model, optimizer])
    if mode == "barrier_destroy":
        dist.barrier()
        dist.destroy_process_group()
    elif mode == "destroy":
        dist.destroy_process_group()
    elif mode != "nothing":
        raise SystemExit(f"unknown mode {mode!r}: use barrier_destroy, destroy or nothing")


if __name__ == "__main__":
    main()
