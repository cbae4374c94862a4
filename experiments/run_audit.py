"""An empirical privacy audit in one training run (Steinke, Nasr and Jagielski 2023) of the product's DP path.

    python scripts/audit.py --out audit.json [--quick] [--canaries 1000] [--plot audit.png]

Each audit trains one data owner with the product's own DP-SGD (PrivacyAccount.plan calibrates the noise for
the claimed epsilon; dplora.train.train_round runs Opacus' clipping, noise and accountant) with m canaries
each put into its data with probability 1/2, then guesses which canaries were in (experiments/audit.py explains the
bound). Mechanisms: `calibrated` (as shipped), `no-noise` (clipping only, no claim), `broken` (the noise
multiplier divided by 10 while still claiming the epsilon). Adversaries: `white-box` (the server, which sees
the owner's update: gradient canaries) and `black-box` (the final global model of a two-owner FedAvg run:
mislabeled sentences, scored by their loss).

--quick (a few minutes on a 2-core CPU): white-box, calibrated at epsilon 1 and 8, no-noise and broken.
Without it: white-box at epsilon 1, 2, 4, 8, no-noise and broken; black-box at epsilon 1 and 8 and no-noise.
Writes JSON {"settings", "audits": [{adversary, mechanism, claimed_epsilon, epsilon_lower_bound, canaries,
correct_guesses, guesses, ...}]} and prints one line per audit; exits 1 if a calibrated audit's lower bound
exceeds its claim.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dplora import config, data, models, synthetic
from dplora.privacy import PrivacyAccount, steps_per_round
from dplora.results import write_json
from dplora.train import sequence_losses, train_round, trim_padding
from experiments import audit

CONFIDENCE = 0.95
DELTA = 1e-5
# The audited owner: the product's tiny random-weight causal LM (LoRA r=8 on the attention projections) on
# 200 synthetic records; q = 0.1, 5 expected epochs = 50 DP steps; plain SGD (the optimizer after the noisy
# sum is post-processing, so the guarantee is the same with any optimizer and learning rate). White-box: a
# small learning rate keeps LoRA's B near zero, so the data's gradients on A stay small and the canaries
# stand out (the audit should be as strong as it can: the claim must hold for every setting). Black-box: a
# learning rate at which the model fits its data, so that it can memorize the canaries.
OWNER = ("model=tiny-llama recipe=plain dataset.num_train=200 dataset.num_test=40 num_rounds=1 "
         "train.optimizer=sgd train.momentum=0 train.learning_rate=0.001 train.sample_rate=0.1 train.local_epochs=5 "
         f"train.batch_size=70 privacy.delta={DELTA}")


def owner_cfg(claimed: float | None, extra: str = ""):
    eps = "null" if claimed is None else claimed
    return config.compose(f"{OWNER} privacy.target_epsilon={eps} {extra}")


def mechanism_account(cfg, mechanism: str, steps: int) -> PrivacyAccount:
    """The owner's account as calibrated for the claim, then (for the negative controls) altered."""
    account = PrivacyAccount.plan(cfg.privacy, float(cfg.train.sample_rate), steps)
    if mechanism == "no-noise":
        account.noise_multiplier = 0.0
    elif mechanism == "broken":
        account.noise_multiplier /= 10
    return account


def white_box(claimed: float, mechanism: str, m: int, k: int, seed: int) -> dict:
    """The server's view: gradient canaries in one owner's DP steps, scored on the owner's update."""
    cfg = owner_cfg(claimed)
    model, tokenizer = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tokenizer, cfg)
    steps = cfg.num_rounds * steps_per_round(cfg.train.sample_rate, cfg.train.local_epochs)
    account = mechanism_account(cfg, mechanism, steps)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    # On LoRA's A matrices: the data's gradients there are proportional to B, which starts at zero, so the
    # canaries' own signal stands out (the strongest placement we found; the guarantee covers any).
    quiet = [i for i, (name, _) in enumerate(named) if "lora_A" in name]
    canaries = audit.DiracCanaries(params, m, account.max_grad_norm, account.sample_rate,
                                   torch.Generator().manual_seed(seed), eligible=quiet)
    start = time.perf_counter()
    train_round(model, train_set, cfg, account, seed=seed, steps=steps, on_backward=canaries.inject)
    scores = canaries.scores(before, [p.detach() for p in params])
    return _result("white-box", mechanism, claimed, account, steps, scores, canaries.included, k, m,
                   time.perf_counter() - start)


def black_box(claimed: float, mechanism: str, m: int, k: int, seed: int) -> dict:
    """The final global model's view: mislabeled sentences in one owner's data, scored by their loss.

    Two owners train the same number of rounds (the audited one with its canaries), the server averages
    their adapters uniformly after every round, and the adversary scores each canary on the final average."""
    cfg = owner_cfg(claimed, "num_rounds=3 train.learning_rate=0.5")
    model, tokenizer = models.build_model(cfg)
    generator = torch.Generator().manual_seed(seed)
    pool = synthetic.synthetic_reviews(num_train=m + 400, num_test=1)[0]
    wrong = [(row["label"] + 1 + int(torch.randint(2, (1,), generator=generator))) % 3 for row in pool[:m]]
    canary_rows = [{"text": row["text"], "label": label} for row, label in zip(pool[:m], wrong, strict=True)]
    included = torch.rand(m, generator=generator) < 0.5
    audited = data.from_rows(pool[m:m + 200] + [r for r, i in zip(canary_rows, included, strict=True) if i])
    other = data.from_rows(pool[m + 200:m + 400])
    owners = [data.encode(audited, tokenizer, cfg), data.encode(other, tokenizer, cfg)]
    per_round = steps_per_round(cfg.train.sample_rate, cfg.train.local_epochs)
    accounts = [mechanism_account(cfg, mechanism, cfg.num_rounds * per_round) for _ in owners]
    start = time.perf_counter()
    global_state = models.adapter_state(model)
    for server_round in range(cfg.num_rounds):
        states = []
        for i, (train_set, account) in enumerate(zip(owners, accounts, strict=True)):
            models.load_adapter_state(model, global_state)
            train_round(model, train_set, cfg, account, seed=seed * 100 + server_round * 10 + i, steps=per_round)
            states.append(models.adapter_state(model))
        global_state = {key: sum(s[key] for s in states) / len(states) for key in states[0]}
    models.load_adapter_state(model, global_state)
    canary_set = data.encode(data.from_rows(canary_rows), tokenizer, cfg)
    scores = -per_example_loss(model, canary_set, cfg)
    result = _result("black-box", mechanism, claimed, accounts[0], cfg.num_rounds * per_round, scores, included,
                     k, m, time.perf_counter() - start)
    result["auc"] = audit.auc(scores, included)
    result["rounds"] = cfg.num_rounds
    return result


@torch.no_grad()
def per_example_loss(model, dataset, cfg) -> torch.Tensor:
    model.eval()
    losses = [sequence_losses(model, trim_padding(list(batch), torch.device("cpu")), cfg.model.task)
              for batch in torch.utils.data.DataLoader(dataset, batch_size=64)]
    model.train()
    return torch.cat(losses)


def _result(adversary, mechanism, claimed, account, steps, scores, included, k, m, seconds) -> dict:
    correct, guesses = audit.guess(scores, included, k)
    bound = audit.epsilon_lower_bound(m, guesses, correct, DELTA, CONFIDENCE)
    return {"adversary": adversary, "mechanism": mechanism,
            "claimed_epsilon": None if mechanism == "no-noise" else claimed,
            "epsilon_lower_bound": bound, "canaries": m, "included": int(included.sum()),
            "correct_guesses": correct, "guesses": guesses, "noise_multiplier": account.noise_multiplier,
            "sample_rate": account.sample_rate, "steps": steps, "delta": DELTA, "seconds": round(seconds, 2)}


def plan(quick: bool) -> list[tuple[str, str, float]]:
    """(adversary, mechanism, claimed epsilon) of every audit to run."""
    audits = [("white-box", "calibrated", eps) for eps in ((1.0, 8.0) if quick else (1.0, 2.0, 4.0, 8.0))]
    audits += [("white-box", "no-noise", 1.0), ("white-box", "broken", 1.0)]
    if not quick:
        audits += [("black-box", "calibrated", 1.0), ("black-box", "calibrated", 8.0), ("black-box", "no-noise", 1.0)]
    return audits


def plot(audits: list[dict], path: Path, cap: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    claims = [a["claimed_epsilon"] for a in audits if a["mechanism"] == "calibrated"]
    top = max([*claims, cap, *(a["epsilon_lower_bound"] for a in audits)]) * 1.15
    ax.plot([0, top], [0, top], color="grey", linestyle="--", label="lower bound = claimed epsilon")
    ax.axhline(cap, color="grey", linestyle=":", label=f"largest bound these canaries can show ({cap:.2f})")
    markers = {"calibrated": "o", "no-noise": "^", "broken": "x"}
    for adversary, color in (("white-box", "tab:blue"), ("black-box", "tab:orange")):
        for mechanism, marker in markers.items():
            rows = [a for a in audits if a["adversary"] == adversary and a["mechanism"] == mechanism]
            if rows:  # no-noise has no claim: drawn at x = 0
                ax.scatter([a["claimed_epsilon"] or 0 for a in rows], [a["epsilon_lower_bound"] for a in rows],
                           color=color, marker=marker, s=60, label=f"{adversary}, {mechanism}")
    ax.set_xlabel("claimed epsilon (no-noise: none, drawn at 0)")
    ax.set_ylabel(f"epsilon lower bound ({CONFIDENCE:.0%} confidence)")
    ax.set_xlim(-0.3, top)
    ax.set_ylim(0, top)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("One-run privacy audit: above the dashed line = claim refuted", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="white-box only: epsilon 1 and 8, no-noise, broken")
    parser.add_argument("--canaries", type=int, default=1000, help="m (default 1000)")
    parser.add_argument("--guesses", type=int, default=None,
                        help="k guesses 'in' and k 'out' (default m/10, fixed before the run)")
    parser.add_argument("--seed", type=int, default=0, help="canary placement and inclusion (not the DP noise)")
    parser.add_argument("--plot", default=None, help="also draw the lower bounds against the claims (PNG)")
    args = parser.parse_args(argv)
    m = args.canaries
    k = args.guesses or m // 10
    if m < 2 or not 0 < 2 * k <= m:
        parser.error(f"need --canaries >= 2 and 0 < 2 x guesses <= canaries (got m={m}, k={k})")
    cap = audit.epsilon_lower_bound(m, 2 * k, 2 * k, DELTA, CONFIDENCE)
    print(f"[audit] m={m} canaries, {k} 'in' + {k} 'out' guesses; with every guess right the bound is "
          f"{cap:.2f} (the most this m and k can show)", flush=True)
    settings = {"owner_overrides": OWNER, "confidence": CONFIDENCE, "delta": DELTA, "canaries": m,
                "guesses_per_side": k, "largest_possible_bound": cap, "seed": args.seed}
    audits = []
    for adversary, mechanism, claimed in plan(args.quick):
        run = white_box if adversary == "white-box" else black_box
        result = run(claimed, mechanism, m, k, args.seed + len(audits))
        audits.append(result)
        flag = ("REFUTED" if result["claimed_epsilon"] is not None and result["epsilon_lower_bound"]
                > result["claimed_epsilon"] else "")
        print(f"[audit] {adversary:9} {mechanism:10} claimed {result['claimed_epsilon']!s:>4}: "
              f"{result['correct_guesses']}/{result['guesses']} right, lower bound "
              f"{result['epsilon_lower_bound']:.3f}" + (f", AUC {result['auc']:.3f}" if "auc" in result else "")
              + f" ({result['steps']} steps, sigma {result['noise_multiplier']:.3f}, {result['seconds']} s) {flag}",
              flush=True)
        write_json(Path(args.out), {"settings": settings, "audits": audits})  # after every audit
    if args.plot:
        plot(audits, Path(args.plot), cap)
    refuted = [a for a in audits if a["mechanism"] == "calibrated" and a["epsilon_lower_bound"] > a["claimed_epsilon"]]
    return 1 if refuted else 0

