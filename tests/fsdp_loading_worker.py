"""Run under torchrun by test_distributed.py: after FSDP's sharded loading (every rank builds the
model on the meta device and reads only its own rows of each weight), every rank's gathered weights
must equal the checkpoint exactly, and cached generation through the sharded model (every rank in each
forward) must give the unsharded model's tokens. Exits non-zero on any difference."""
import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from nanotune.distributed import compute_cleanup, compute_init, wrap_fsdp
from nanotune.generate import generate
from nanotune.models import from_pretrained

path = sys.argv[1]
world = compute_init("fsdp", "cpu")
model = from_pretrained(path, device="meta")
model = wrap_fsdp(model, world)
assert all(p.to_local().shape[0] < p.shape[0] for p in model.parameters()), "a rank holds a whole weight"
gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
reference = from_pretrained(path).state_dict()
assert gathered.keys() == reference.keys()
for key, value in reference.items():
    assert torch.equal(gathered[key].cpu(), value), f"rank {world.rank}: {key} differs"
print(f"rank {world.rank}: {len(reference)} tensors identical", flush=True)
prompts = [[5, 17, 3], [9, 40, 2, 77, 12, 6, 31]]  # of different lengths: left padding and its mask too
assert generate(model.eval(), prompts, 8) == generate(from_pretrained(path).eval(), prompts, 8), world.rank
print(f"rank {world.rank}: generation through FSDP as without it", flush=True)
compute_cleanup()
os._exit(0)  # as train.py does: gloo's workers must not race interpreter teardown
