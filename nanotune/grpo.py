"""GRPO (Shao et al. 2024, DeepSeekMath sec. 4.1): reinforcement learning from rewards a program computes.

Each step samples G completions of every prompt with the model as it is (nanotune.generate), scores them
(nanotune.rewards), and raises the log-probability of the completions that scored above their group's mean:

    advantage  A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)   (--no-scale-rewards: r_i - mean, Dr. GRPO)
    ratio      rho_t = pi(o_t | q, o_<t) / pi_old(o_t | ...)           1 in value when a rollout is used once
    loss_t     -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta KL_t
    KL_t       pi_ref / pi - log(pi_ref / pi) - 1                       (Schulman's k3, unbiased and >= 0)

summed over the completion tokens (each completion ends with its stop token; nothing after it is
trained) and divided by the global batch's completion tokens (--loss-norm token: DAPO, TRL's default) or
averaged per completion, then over completions (sequence: the paper's eq. 3). This is what TRL's
GRPOTrainer computes (loss_type dapo or grpo, scale_rewards group or none, importance sampling per token).

Where the pieces sit: Rollouts is grpo's data, read by train.py's loop as it reads Batches: step(s) returns
the micro-batches of step s with their completions sampled, scored and turned into advantages. The loss
is an objective like the others (nanotune.objectives), from (model, micro-batch) to (loss, figures), on
the per-token log-probs every objective uses (CausalLM.forward(logprobs=True)). The reference, for beta >
0, is the model training started from: its trained weights are kept and swapped in for one no-grad forward
per micro-batch (a LoRA adapter's copy is small; a full fine-tune keeps a second copy of its weights).
Under DeepSpeed the copy is taken before the engine exists (start_weights), as a resumed run restores
its weights there; ZeRO-3's partitioned weights are gathered whole to be swapped (GatheredParameters).
"""
import math
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from nanotune import UserError
from nanotune.data import Batches, Example, check_file, collate, field, prompt_dialogue, read_rows
from nanotune.distributed import all_reduce_sum, print0
from nanotune.generate import generate
from nanotune.loss import IGNORE
from nanotune.rewards import load_rewards, score


# --- The loss ---------------------------------------------------------------------------------------------

def advantages(rewards, G, scale=True):
    """rewards (P * G,), each prompt's G completions together -> A (P * G,): centred in each group and,
    with scale, divided by the group's (unbiased, as TRL) std + 1e-4. Equal rewards give A = 0."""
    groups = rewards.view(-1, G)
    A = groups - groups.mean(1, keepdim=True)
    if scale:
        A = A / (groups.std(1, keepdim=True) + 1e-4)
    return A.flatten()


def grpo_token_loss(logps, old, ref, A, eps, beta):
    """Per-token loss (R, T) from the policy's log-probs (R, T) (with gradient), those of the policy that
    generated (old) and of the reference (ref, None when beta is 0), and A (R,); also the k3 KL (R, T) and
    which tokens were clipped (R, T): a ratio outside [1 - eps, 1 + eps] on the side that stops the update."""
    ratio = torch.exp(logps - old)
    A = A[:, None]
    loss = -torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    kl = torch.zeros_like(logps)
    if beta:
        kl = torch.exp(ref - logps) - (ref - logps) - 1
        loss = loss + beta * kl
    clipped = ((ratio < 1 - eps) & (A < 0)) | ((ratio > 1 + eps) & (A > 0))
    return loss, kl.detach(), clipped


def grpo(model, batch, n_tokens, n_prompts, G, eps, beta, per_sequence, reused, reference):
    """The objective: batch = input_ids, labels (R, T) (prompt then completion, only completion tokens
    labelled), A (R,), then old log-probs (R, T) when rollouts are reused (else: these, detached), then the
    reference's (R, T) when beta > 0. n_tokens: completion tokens of the global batch; n_prompts x G
    completions in it. Returns the loss share of this micro-batch and kl, clip_ratio per token."""
    input_ids, labels, A, *rest = batch
    logps = model(input_ids, labels, logprobs=True)  # (R, T), 0 where labels == IGNORE
    old = rest.pop(0) if reused else logps.detach()
    ref = rest.pop(0) if reference else None
    mask = (labels != IGNORE).float()
    loss, kl, clipped = grpo_token_loss(logps, old, ref, A, eps, beta)
    if per_sequence:  # the paper: a mean over each completion's tokens, then over completions
        loss = ((loss * mask).sum(1) / mask.sum(1)).sum() / (n_prompts * G)
    else:  # DAPO: one mean over every completion token of the global batch
        loss = (loss * mask).sum() / n_tokens
    figures = {"clip_ratio": float((clipped * mask).sum()) / n_tokens}
    if beta:
        figures["kl"] = float((kl * mask).sum()) / n_tokens
    return loss, figures


# --- Prompts: SFT rows read for their prompts and reference answers ------------------------------------------

def prompt_turns(row, where):
    """A row -> (system, the conversation up to the turn to answer, that turn's text, the reference answer or
    None). Alpaca, ShareGPT (the last user turn is answered; its reply, if any, is the reference), and TRL's
    {"prompt": text or messages, "answer"}."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be a JSON object, not {type(row).__name__}")
    system, dialogue = prompt_dialogue(row, where)
    if dialogue is None:
        raise UserError(f"{where}: --objective grpo needs a prompt: 'instruction' (Alpaca), 'conversations' "
                        f"(ShareGPT) or 'prompt' (TRL); found keys {sorted(row)}")
    if "prompt" in row:
        reference = field(row, "answer", where) if row.get("answer") is not None else None
    elif "conversations" in row:  # the last user turn is answered; its reply, if any, is the reference
        last = max((i for i, (role, _) in enumerate(dialogue) if role == "user"), default=None)
        if last is None:
            raise UserError(f"{where}: the conversation has no user turn to answer")
        reference = dialogue[last + 1][1] if last + 1 < len(dialogue) else None
        dialogue = dialogue[:last + 1]
    else:
        reference = field(row, "output", where) if row.get("output") is not None else None
    if dialogue[-1][0] != "user":
        raise UserError(f"{where}: the prompt must end with a user turn for the model to answer")
    return system, dialogue, dialogue[-1][1], reference


class Prompts:
    """The rows of a grpo run: per row the prompt's token ids (template rendered, answer header included),
    its user turn (what a reward sees as the prompt) and its reference answer (or None). Small enough to
    hold in memory: RL data is thousands of prompts, not millions of rows."""

    def __init__(self, prompts, users, references):
        self.prompts, self.users, self.references = prompts, users, references
        self.targets = np.ones(len(prompts), dtype=np.int64)  # Batches counts units by it: one per prompt

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        """Row i as the model first sees it: its prompt, nothing trained (the completions come each step)."""
        return Example(self.prompts[i], [False] * len(self.prompts[i]), self.prompts[i], self.references[i])

    def subset(self, index):
        return Prompts(*([items[int(i)] for i in index] for items in (self.prompts, self.users, self.references)))

    def scored(self, k, template):
        """Up to k rows with a reference, as exact match scores them."""
        return [Example([], [], p, r) for p, r in zip(self.prompts, self.references) if r is not None][:k]


def load_prompts(path, template, max_seq_len):
    """Prompts of every row of a .json/.jsonl file; a prompt longer than max_seq_len tokens is dropped."""
    check_file(path)
    prompts, users, references, dropped = [], [], [], 0
    for where, _, row in read_rows(path):
        system, dialogue, user, reference = prompt_turns(row, where)
        ids = template.prompt(system, dialogue, where)
        if len(ids) > max_seq_len:
            dropped += 1
            continue
        prompts.append(ids)
        users.append(user)
        references.append(reference)
    if not prompts:
        raise UserError(f"{path}: every prompt is longer than --max-seq-len {max_seq_len} tokens; raise it")
    print0(f"data: {len(prompts)} prompts from {path} ({sum(r is not None for r in references)} with a reference "
        f"answer); {dropped} dropped, longer than --max-seq-len {max_seq_len}")
    return Prompts(prompts, users, references)


class PromptBatches(Batches):
    """Batches (nanotune.data) of prompts: a micro-batch is the list of its prompts' positions."""

    def collate(self, units):
        return [int(unit[0]) for unit in units]


# --- Rollouts: sample, score, and turn rewards into advantages ------------------------------------------------

class Rollouts:
    """grpo's data for train.py's loop: step(s) -> (micro-batches, completion tokens in the global batch).

    The prompts of step s are those Batches gives step s // --grpo-iterations: each set of completions
    trains --grpo-iterations optimizer steps (1: each is used once, the ratio is 1 in value). Each process
    samples for its own prompts, a micro-batch of B prompts x G completions per generate call, so a
    prompt's group stays on one process. Sampling draws from a generator seeded by (seed, step, micro-batch
    of the global batch): a resumed run samples the very completions the uninterrupted one did, with no
    state to save, and one process with accumulation those of several without. Under FSDP and DeepSpeed
    every forward of generation is a collective, so the processes end generation together."""

    def __init__(self, prompts, model, template, args, world, precision, named_trainable, start=None):
        self.batches = PromptBatches(prompts, args.batch_size, args.grad_accum, world.size, world.rank, args.seed)
        self.prompts, self.model, self.template, self.args = prompts, model, template, args
        self.world, self.precision = world, precision
        self.G, self.iterations = args.num_generations, args.grpo_iterations
        self.global_batch = self.batches.global_batch  # prompts
        self.steps_per_epoch = self.batches.steps_per_epoch * self.iterations
        self.rewards = load_rewards(tuple(args.reward))
        self.weights = torch.tensor(args.reward_weights or [1.0] * len(self.rewards))
        # The reference (beta > 0): the trained weights as training starts (this rank's shards under FSDP;
        # under DeepSpeed `start`, taken before wrap restored a resumed run's weights).
        self.reference = (start or [p.detach().clone() for _, p in named_trainable]) if args.beta else None
        self.trainable = [p for _, p in named_trainable]
        self.kept, self.figures = None, {}

    def step(self, step):
        """(micro-batches, completion tokens in the global batch) of optimizer step `step`; self.figures
        then holds the step's rollout figures, over every process."""
        if step % self.iterations:  # the completions sampled at the last sampling step, trained on again
            self.figures["generation_seconds"] = 0.0
            return self.kept
        clock = time.time()
        first = self.world.rank * self.args.grad_accum  # this rank's first micro-batch in the global batch
        rollouts = [self.sample(positions, step, first + i)
                    for i, positions in enumerate(self.batches.step(step // self.iterations)[0])]
        seconds = time.time() - clock
        users, texts, references = ([x for r in rollouts for x in r[key]] for key in ("users", "texts", "references"))
        scores = torch.tensor(score(self.rewards, users, texts, references)).T  # (completions, functions)
        rewards = scores @ self.weights  # (completions,), micro-batch after micro-batch
        micro = [self.micro_batch(r["examples"], reward)
                 for r, reward in zip(rollouts, rewards.split(len(rollouts[0]["examples"])))]
        n_tokens = sum(len(ex.tokens) - len(ex.prompt) for r in rollouts for ex in r["examples"])
        n, total, squares, seconds, n_tokens, *per_function = all_reduce_sum(
            [len(rewards), float(rewards.sum()), float((rewards ** 2).sum()), seconds, n_tokens,
             *scores.sum(0).tolist()])
        self.figures = {"reward": total / n, "reward_std": math.sqrt(max(0.0, squares - total ** 2 / n) / (n - 1)),
                        **{f"reward_{name}": s / n for (name, _), s in zip(self.rewards, per_function)},
                        "completion_length": n_tokens / n, "generation_seconds": seconds / self.world.size}
        self.kept = micro, int(n_tokens)
        return self.kept

    def micro_batch(self, examples, rewards):
        """input_ids, labels (R, T), the advantages (R,), then the log-probs (R, T) of the policy that sampled
        (when completions are trained on more than once) and of the reference (beta > 0): grpo()'s batch."""
        input_ids, labels = (t.to(self.world.device) for t in collate(examples, self.template.tokenizer.pad_id))
        batch = [input_ids, labels, advantages(rewards, self.G, self.args.scale_rewards).to(self.world.device)]
        if self.iterations > 1:  # in the mode the update runs in (dropout on), as TRL
            batch.append(self.logps(input_ids, labels))
        if self.reference:
            with self.swapped_in():
                batch.append(self.logps(input_ids, labels))
        return batch

    def sample(self, positions, step, index):
        """G completions of each prompt at these positions, the index-th micro-batch of the global batch:
        Examples of prompt + completion (the completion trained, its stop token included), and what the
        rewards read. The seed depends on (seed, step, index), so the same micro-batch samples the same
        completions on any number of processes."""
        seed = int(np.random.SeedSequence([self.args.seed, step, index]).generate_state(1)[0])
        rows = [i for i in positions for _ in range(self.G)]  # each prompt G times, its group together
        prompts = [self.prompts.prompts[i] for i in rows]
        new = self.generate(prompts, torch.Generator().manual_seed(seed))
        stops = self.template.stop_ids
        return {"examples": [Example(p + ids, [False] * len(p) + [True] * len(ids), p, None)
                             for p, ids in zip(prompts, new)],
                "texts": [self.template.tokenizer.decode(ids[:-1] if ids[-1] in stops else ids) for ids in new],
                "users": [self.prompts.users[i] for i in rows],
                "references": [self.prompts.references[i] for i in rows]}

    @torch.compiler.set_stance("force_eager")  # under --compile: each cached length would compile again
    def generate(self, prompts, generator):
        """Completions of `prompts`, each with its stop token if it reached one, with dropout off."""
        together = self.world.strategy in ("fsdp", "deepspeed")  # every rank in every forward: end together
        self.model.eval()
        with self.precision.context(self.world.device):
            new = generate(self.model, prompts, self.args.max_new_tokens, self.args.temperature, 0, self.args.top_p,
                           self.template.stop_ids, generator, with_stop=True,
                           finished=(lambda done: all_reduce_sum([float(not all(done))])[0] == 0) if together else all)
        self.model.train()
        return new

    @torch.no_grad()
    def logps(self, input_ids, labels):
        with self.precision.context(self.world.device):
            return self.model(input_ids, labels, logprobs=True)

    @contextmanager
    def swapped_in(self):
        """The reference's weights in place of the trained ones, for a no-grad forward. A ZeRO-3 weight is
        an empty placeholder beside this rank's partition: it is gathered whole, written, and partitioned
        again (each rank writes the same values), so the forward gathers the reference's partitions."""
        with torch.no_grad():
            with whole(self.trainable):
                now = [p.detach().clone() for p in self.trainable]
                for p, start in zip(self.trainable, self.reference):
                    p.copy_(start)
            try:
                yield
            finally:
                with whole(self.trainable):
                    for p, current in zip(self.trainable, now):
                        p.copy_(current)


def whole(params):
    """ZeRO-3's parameters gathered whole, rank 0's values written back to every partition on exit."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@torch.no_grad()
def start_weights(model, args, world):
    """grpo's reference under DeepSpeed (--beta > 0): the trainable weights before wrap(), which restores a
    resumed run's weights before the engine is built. A weight still on the meta device (a ZeRO-3 full
    fine-tune reads the base as it partitions it) is read from the base. None elsewhere: Rollouts copies
    the weights itself (under FSDP this rank's shards, which exist only after wrap)."""
    if args.objective != "grpo" or not args.beta or world.strategy != "deepspeed":
        return None
    return [model.weights.read(name, p.dtype, "cpu") if p.is_meta else p.detach().clone()
            for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def evaluate_rewards(model, prompts, args, template, world, precision):
    """eval_reward (and eval_reward_<name>): the mean reward of greedy completions of the held-out prompts.
    Every rank generates for every prompt: a sharded model needs all ranks in each forward."""
    rewards = load_rewards(tuple(args.reward))
    weights = torch.tensor(args.reward_weights or [1.0] * len(rewards))
    tokenizer, texts = template.tokenizer, []
    model.eval()
    for i in range(0, len(prompts), args.batch_size * args.num_generations):
        with precision.context(world.device):
            new = generate(model, prompts.prompts[i:i + args.batch_size * args.num_generations], args.max_new_tokens,
                           eos=template.stop_ids)
        texts += [tokenizer.decode(ids) for ids in new]
    model.train()
    scores = torch.tensor(score(rewards, prompts.users, texts, prompts.references)).T  # (prompts, functions)
    return {"eval_reward": float((scores @ weights).mean()),
            **{f"eval_reward_{name}": float(s) for (name, _), s in zip(rewards, scores.mean(0))}}


def check_grpo_flags(args):
    """--objective grpo's defaults (as TRL's GRPOConfig, but --max-new-tokens 64) and ranges."""
    defaults = {"num_generations": 8, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "clip_eps": 0.2,
                "grpo_iterations": 1, "loss_norm": "token", "beta": 0.0}
    if args.objective != "grpo":
        given = [name for name in (*defaults, "reward", "reward_weights")
                 if name != "beta" and getattr(args, name) is not None]
        if given or not args.scale_rewards:
            flag = "--" + (given[0] if given else "no_scale_rewards").replace("_", "-")
            raise UserError(f"{flag} applies to --objective grpo only")
        return
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.label_smoothing or args.simpo_gamma is not None:
        raise UserError("--label-smoothing and --simpo-gamma apply to preference objectives, not to grpo")
    if not args.reward:
        raise UserError("--objective grpo needs --reward: a built-in (exact_match, length) or FILE.py:FUNCTION")
    if args.reward_weights is not None and len(args.reward_weights) != len(args.reward):
        raise UserError(f"--reward-weights gives {len(args.reward_weights)} weights for {len(args.reward)} rewards; "
                        "give one per --reward")
    if args.num_generations < 2:
        raise UserError(f"--num-generations must be >= 2 (a group's advantages compare its completions), got "
                        f"{args.num_generations}")
    for flag, value, ok in (("--temperature", args.temperature, args.temperature > 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1),
                            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--clip-eps", args.clip_eps, 0 < args.clip_eps < 1),
                            ("--grpo-iterations", args.grpo_iterations, args.grpo_iterations >= 1),
                            ("--beta", args.beta, args.beta >= 0)):
        if not ok:
            raise UserError(f"--{flag[2:]} is out of range: {value} (temperature > 0, top-p in (0, 1], max-new-tokens "
                            ">= 1, clip-eps in (0, 1), grpo-iterations >= 1, beta >= 0)")
    if args.save_every % args.grpo_iterations:
        raise UserError(f"--save-every {args.save_every} must be a multiple of --grpo-iterations "
                        f"{args.grpo_iterations}: a checkpoint is written where new completions are sampled, "
                        "so a resume needs none kept")
    if args.packing or args.train_on_prompt:
        raise UserError("--packing and --train-on-prompt do not apply to --objective grpo (it trains on the "
                        "completions it samples); drop the flag")
