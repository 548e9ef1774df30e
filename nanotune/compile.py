"""--compile: torch.compile applied per transformer block (regional compilation).

Eager PyTorch runs every norm, activation, rotary product, residual add and autocast cast of a block
as its own kernel, each a pass over memory; inductor fuses them into a few. Every block of a model runs
the same code on tensors of the same shapes, so dynamo traces Block.forward once and every block reuses
that graph, its weights being the graph's inputs rather than constants: compile time does not grow
with depth (torchtune and torchtitan compile this way). Under LoRA that is two graphs, not one: the
first block's input, the frozen embedding's output, needs no gradient and the others' do.

Compiled in place (nn.Module.compile): the blocks keep their names, hooks and state dict, so FSDP
shards them afterwards (compile before fully_shard, as the PyTorch docs order it) and checkpoints
and adapters read the same. What stays eager: the embedding, the final norm and the fused loss
(a chunked loop of GEMMs and softmax passes, nanotune.loss), attention's kernel itself (inductor
calls the same SDPA kernel), and generation and evaluation (train.py runs them under
torch.compiler.set_stance("force_eager"): a KV cache grows by one position per token, which
would compile again and again).
"""


def compile_blocks(model):
    """Compile each of model.blocks in place; the compiling itself happens in the first step. The first
    new sequence length compiles once more, with the length symbolic from then on (dynamo's automatic
    dynamic shapes): rows are padded to the longest of each micro-batch, so lengths vary by step."""
    for block in model.blocks:
        block.compile()
    return model
