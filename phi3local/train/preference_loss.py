"""Preference losses on per-pair log-probabilities: DPO, IPO, ORPO, SimPO (pure torch, no model).

The caller (the `preference` task's loop) runs the model on prompt+chosen and prompt+rejected, sums the
log-probabilities of the answer tokens only (`chosen_ids` / `rejected_ids` of the prepared data, each ending
with `<|end|>`), and passes these sums per pair with the answer lengths. Notation, per pair:

    pc, pr   policy log-prob of the chosen / rejected answer, summed over its tokens   (policy_*_logps)
    rc, rr   the same under the frozen reference (the model with the adapter disabled) (reference_*_logps)
    |yc|,|yr| answer lengths in tokens                                                    (*_lengths)
    ac = pc/|yc|, ar = pr/|yr|   mean token log-probs
    nll      token-mean NLL of the chosen answer (the SFT loss on it)                   (chosen_nll)
    sigma    the logistic function; w = sft_weight

- dpo (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7; TRL DPOTrainer
  loss_type="sigmoid"):        loss = -log sigma(beta * ((pc - rc) - (pr - rr)))            [+ w * nll]
- ipo (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
  arXiv:2310.12036, eq. 17, with TRL DPOTrainer loss_type="ipo"'s per-token normalisation, which TRL states
  the IPO authors confirmed):  h = (pc - rc)/|yc| - (pr - rr)/|yr|;  loss = (h - 1/(2 beta))^2  [+ w * nll]
- orpo (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691, eqs. 4-7; TRL ORPOTrainer): no reference;
      log_odds = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)))
      loss = w * nll - beta * log sigma(log_odds)          (w defaults to 1; beta is the paper's lambda)
- simpo (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734, eq. 6; TRL CPOTrainer loss_type="simpo"): no reference;
      loss = -log sigma(beta * (ac - ar - simpo_gamma / beta))                             [+ w * nll]
  (that is -log sigma(beta (ac - ar) - gamma); with w > 0 it is CPO-SimPO, TRL's cpo_alpha).

The per-pair losses are returned; their mean over a batch is the loss TRL computes for that batch (with
`chosen_nll` the batch's token-mean NLL passed as a scalar, TRL's ORPO/CPO NLL is exactly that; a per-pair
NLL gives the mean of per-pair NLLs instead).

Metrics (as TRL names and defines them; each a detached [pairs] tensor, TRL logs their means):
    rewards/chosen, rewards/rejected   dpo/ipo: beta * (pc - rc), beta * (pr - rr);  orpo/simpo: beta * ac, beta * ar
    rewards/accuracies                 1.0 where rewards/chosen > rewards/rejected (strictly), else 0.0
    rewards/margins                    rewards/chosen - rewards/rejected
    logps/chosen, logps/rejected       dpo/ipo: pc, pr (sums);  orpo/simpo: ac, ar (means)
    nll_loss                           when chosen_nll is given
    log_odds_ratio, log_odds_chosen    orpo: log sigma(log_odds) and log_odds
At step 0 with a fresh LoRA adapter (B = 0) the policy equals the reference, so the DPO loss is ln 2 and
every reward and margin is 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_LOSSES = ("dpo", "ipo")  # the others need no reference model
MEAN_LOGP_LOSSES = ("orpo", "simpo")  # these score answers by mean token log-prob


def uses_reference(loss: str) -> bool:
    """Whether `loss` needs the reference model's log-probs."""
    _check_name(loss)
    return loss in REFERENCE_LOSSES


def default_sft_weight(loss: str) -> float:
    """preference.sft_weight when the recipe leaves it null: 1.0 for orpo (its NLL term), 0 for the others."""
    _check_name(loss)
    return 1.0 if loss == "orpo" else 0.0


def _check_name(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown preference loss {loss!r} (known: {', '.join(LOSSES)})")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012; as TRL's ORPO)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _float(t: torch.Tensor) -> torch.Tensor:
    # Half precision is not enough for differences of summed log-probs; float64 stays float64.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def preference_loss(
    loss: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None = None,
    reference_rejected_logps: torch.Tensor | None = None,
    *,
    beta: float,
    sft_weight: float | None = None,
    simpo_gamma: float = 0.5,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    chosen_nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss per pair [pairs], metrics {name: detached [pairs] tensor}) of one batch of pairs.

    policy_*_logps / reference_*_logps: [pairs] log-probs of each answer's tokens, SUMMED over the answer
    (the reference ones are needed by dpo and ipo only, and get no gradient). chosen_lengths /
    rejected_lengths: [pairs] answer token counts (>= 1). chosen_nll: the chosen answers' token-mean NLL,
    [pairs] or a scalar, needed when the effective sft_weight is > 0 (sft_weight None: 1.0 for orpo, 0 for
    the others). Formulas and metric definitions: the module docstring.
    """
    _check_name(loss)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    weight = default_sft_weight(loss) if sft_weight is None else float(sft_weight)
    pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
    if pc.shape != pr.shape or pc.dim() != 1:
        raise ValueError(f"policy logps must be two [pairs] tensors, got {tuple(pc.shape)} and {tuple(pr.shape)}")
    nc = chosen_lengths.to(pc.dtype).clamp(min=1.0)
    nr = rejected_lengths.to(pc.dtype).clamp(min=1.0)
    metrics: dict[str, torch.Tensor] = {}

    if loss in REFERENCE_LOSSES:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(f"the {loss} loss needs the reference model's log-probs (reference_*_logps)")
        rc = _float(reference_chosen_logps).detach()
        rr = _float(reference_rejected_logps).detach()
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError("reference logps must have the policy logps' shape [pairs]")
        chosen_logratios = pc - rc
        rejected_logratios = pr - rr
        if loss == "dpo":
            per_pair = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
        else:
            h = chosen_logratios / nc - rejected_logratios / nr
            per_pair = (h - 1 / (2 * beta)) ** 2
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
        logps_chosen, logps_rejected = pc.detach(), pr.detach()
    else:
        ac, ar = pc / nc, pr / nr
        if loss == "orpo":
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            ratio = F.logsigmoid(log_odds)
            per_pair = -beta * ratio
            metrics["log_odds_ratio"] = ratio.detach()
            metrics["log_odds_chosen"] = log_odds.detach()
        else:
            per_pair = -F.logsigmoid(beta * ((ac - ar) - simpo_gamma / beta))
        chosen_rewards = beta * ac.detach()
        rejected_rewards = beta * ar.detach()
        logps_chosen, logps_rejected = ac.detach(), ar.detach()

    if chosen_nll is not None:
        nll = _float(chosen_nll)
        per_pair = per_pair + weight * nll if weight else per_pair
        metrics["nll_loss"] = nll.detach().expand_as(pc) if nll.dim() == 0 else nll.detach()
    elif weight:
        raise ValueError(f"sft_weight {weight} needs chosen_nll (the chosen answers' token-mean NLL)")

    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(pc.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": logps_chosen,
        "logps/rejected": logps_rejected,
        **metrics,
    }
    return per_pair, metrics


def summarize(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged values: each metric's mean over its pairs (concatenate micro-batches first for a step)."""
    return {name: float(value.float().mean()) for name, value in metrics.items()}


__all__ = [
    "LOSSES",
    "MEAN_LOGP_LOSSES",
    "REFERENCE_LOSSES",
    "default_sft_weight",
    "log1mexp",
    "preference_loss",
    "summarize",
    "uses_reference",
]
