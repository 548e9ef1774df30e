"""nanotune: LLM fine-tuning (LoRA, int8/4-bit, DDP, FSDP, DeepSpeed) in plain PyTorch."""


class UserError(Exception):
    """Bad input from the user. train.py prints the message as one line and exits with status 1."""
