"""Training objectives: each turns (model, micro-batch) into (loss, figures to log), and train.py calls the one
--objective names, in the same loop for all.

    sft    next-token cross-entropy, the mean over the trained tokens of the global batch
    dpo    Rafailov et al. 2023, eq. 7; with --label-smoothing, conservative DPO (cDPO)
    ipo    Azar et al. 2023, eq. 17, on mean log-probs as TRL computes it
    simpo  Meng et al. 2024, eq. 6: no reference, mean log-probs and a target margin gamma
    orpo   Hong et al. 2024, eq. 6-7: SFT's loss on the chosen answers plus an odds-ratio term
    grpo   Shao et al. 2024: on completions sampled each step and scored by rewards (nanotune.grpo)

A preference micro-batch holds P pairs as 2P rows, each chosen row followed by its rejected one, in one
forward (nanotune.pairs). Every objective rests on one piece, row_logps: the summed log-probability of each
row's trained tokens, from the fused head (nanotune.loss.token_logprobs: no (rows x T x V) logits kept for
the backward). The reference, for dpo and ipo, is the model training starts from: its row_logps were
computed once before step 1 and travel with the batch (nanotune.pairs.attach_reference).

Normalisation: an objective returns its micro-batch's share of the global batch's mean, dividing by the
global count of pairs (n_pairs) or trained tokens (n_tokens), so the micro-batches of every process sum to
the mean however the batch is split; train.py multiplies by the world size because DDP and FSDP average
gradients over ranks. The figures are shares of means in the same way: summed over micro-batches and
processes they are the global batch's means.
"""
from functools import partial

import torch
import torch.nn.functional as F

from nanotune import UserError
from nanotune.grpo import check_grpo_flags, grpo
from nanotune.loss import IGNORE

NAMES = ("sft", "dpo", "ipo", "simpo", "orpo", "grpo")
WITH_REFERENCE = ("dpo", "ipo")
FIGURES = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
           "logps_rejected")


def row_logps(model, input_ids, labels, positions=None, row_lengths=None):
    """(summed log-probability of each row's trained tokens (R,) fp32, their count (R,)): the shared piece
    of every objective (SFT's loss is minus its sum; a policy gradient would weigh the (B, T) terms). The
    rows are those of input_ids (B, T), or of packed sequences (nanotune.packing) the rows of row_lengths in
    order, each sequence's padding left out (it trains no token; every row trains at least one)."""
    token = model(input_ids, labels, positions, row_lengths, logprobs=True)  # (B, T), 0 where labels == IGNORE
    trained = labels != IGNORE
    if row_lengths is None:
        return token.sum(1), trained.sum(1)
    row = torch.arange(len(row_lengths), device=token.device).repeat_interleave(
        row_lengths.to(token.device), output_size=token.numel())  # (B*T,) the packed row of each position
    sums = token.new_zeros(len(row_lengths)).index_add(0, row, token.flatten())
    counts = torch.zeros_like(sums, dtype=torch.long).index_add(0, row, trained.flatten().long())
    return sums[counts > 0], counts[counts > 0]


# --- The losses, from per-pair log-probs (P,) to (loss per pair, chosen reward, rejected reward) -------------

def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=0.0):
    """DPO (eq. 7): -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)); cDPO (Mitchell 2023)
    assumes a share eps of the labels flipped: -(1 - eps) log sigmoid(d) - eps log sigmoid(-d)."""
    d = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    loss = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    return loss, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def ipo_loss(m_c, m_r, mref_c, mref_r, beta):
    """IPO (eq. 17): (h - 1 / (2 beta))^2, h the difference of log-ratios, here of mean log-probs (TRL)."""
    h = (m_c - mref_c) - (m_r - mref_r)
    return (h - 1 / (2 * beta)) ** 2, beta * (m_c - mref_c).detach(), beta * (m_r - mref_r).detach()


def simpo_loss(m_c, m_r, beta, gamma):
    """SimPO (eq. 6): -log sigmoid(beta * m(chosen) - beta * m(rejected) - gamma); no reference."""
    return -F.logsigmoid(beta * (m_c - m_r) - gamma), beta * m_c.detach(), beta * m_r.detach()


def orpo_odds_loss(m_c, m_r, beta):
    """ORPO's odds-ratio term (eq. 7), times beta: -beta log sigmoid(log odds(c) - log odds(r)), with
    log odds(y) = m(y) - log(1 - exp(m(y))); its SFT term is added by orpo() over the tokens."""
    log_odds = (m_c - torch.log1p(-torch.exp(m_c))) - (m_r - torch.log1p(-torch.exp(m_r)))
    return -beta * F.logsigmoid(log_odds), beta * m_c.detach(), beta * m_r.detach()


# --- Objectives: (model, batch, n_tokens, n_pairs) -> (loss, figures) ------------------------------------------

def sft(model, batch, n_tokens, n_pairs):
    """batch: (input_ids, labels), packed ones also (positions, row_lengths)."""
    return model(*batch) / n_tokens, {}


def preference(loss_fn, mean, nll, with_reference, model, batch, n_tokens, n_pairs):
    """A pair objective. batch: the model's inputs (input_ids, labels, packed ones also positions, row_lengths),
    and with_reference the reference's row_logps (2P,) last. mean: loss_fn reads mean log-probs
    m = logp / trained tokens, not sums; nll: add SFT's loss on the chosen answers."""
    inputs, reference = (batch[:-1], batch[-1:]) if with_reference else (batch, [])
    logps, counts = row_logps(model, *inputs)  # (2P,) c0 r0 c1 r1 ...
    scores = [logps / counts if mean else logps] + [r / counts if mean else r for r in reference]
    losses, reward_c, reward_r = loss_fn(*(s[k::2] for s in scores for k in (0, 1)))
    loss = losses.sum() / n_pairs
    if nll:  # ORPO's SFT term: the mean NLL per trained token of the chosen answers of the global batch
        loss = loss - logps[0::2].sum() / n_tokens
    figures = torch.stack([reward_c.sum(), reward_r.sum(), (reward_c - reward_r).sum(),  # FIGURES' order
                           (reward_c > reward_r).sum().float(), logps[0::2].detach().sum(), logps[1::2].detach().sum()])
    return loss, {k: v / n_pairs for k, v in zip(FIGURES, figures.tolist())}


def objective(args):
    """The --objective as one function (model, batch, n_tokens, n_pairs) -> (loss, figures)."""
    if args.objective == "sft":
        return sft
    if args.objective == "grpo":
        return partial(grpo, G=args.num_generations, eps=args.clip_eps, beta=args.beta,
                       per_sequence=args.loss_norm == "sequence", reused=args.grpo_iterations > 1,
                       reference=args.beta > 0)
    loss_fn, mean = {"dpo": (partial(dpo_loss, beta=args.beta, label_smoothing=args.label_smoothing), False),
                     "ipo": (partial(ipo_loss, beta=args.beta), True),
                     "simpo": (partial(simpo_loss, beta=args.beta, gamma=args.simpo_gamma), True),
                     "orpo": (partial(orpo_odds_loss, beta=args.beta), True)}[args.objective]
    return partial(preference, loss_fn, mean, args.objective == "orpo", args.objective in WITH_REFERENCE)


def check_objective_flags(args):
    """Defaults that depend on the objective (None: --beta 2.0 for simpo as its paper, else 0.1 as TRL;
    --simpo-gamma 0.5 as TRL's CPOConfig), and the flags' ranges; grpo's in nanotune.grpo."""
    check_grpo_flags(args)
    if args.objective == "grpo":
        return
    if args.objective == "sft":
        if args.beta is not None or args.label_smoothing or args.simpo_gamma is not None:
            raise UserError("--beta, --label-smoothing and --simpo-gamma apply to the preference objectives "
                            "(--objective dpo, ipo, simpo, orpo), not to sft")
        return
    if args.beta is None:
        args.beta = 2.0 if args.objective == "simpo" else 0.1
    if args.objective == "simpo" and args.simpo_gamma is None:
        args.simpo_gamma = 0.5
    if args.train_on_prompt:
        raise UserError(f"--train-on-prompt is not offered with --objective {args.objective}: a pair trains on its "
                        "final answers; drop the flag")
    if not args.beta > 0:
        raise UserError(f"--beta must be > 0, got {args.beta}")
    if not 0 <= args.label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.objective != "dpo":
        raise UserError("--label-smoothing (conservative DPO) applies to --objective dpo only")
    if args.simpo_gamma is not None and args.objective != "simpo":
        raise UserError("--simpo-gamma applies to --objective simpo only")
    if args.simpo_gamma is not None and args.simpo_gamma < 0:
        raise UserError(f"--simpo-gamma must be >= 0, got {args.simpo_gamma}")
