"""What a causal LM reads and answers: the prompt (plain, or through the tokenizer's chat template) and the answer.

Plain (`model.chat_template: false`, base and random-weight models): BOS + `dataset.prompt`, answer " <label>" +
EOS. Chat (`model.chat_template: true`, instruct models): the tokenizer's own template renders a system turn
(`dataset.instruction`) and a user turn (`dataset.prompt`), then opens the assistant turn; the answer is
"<label>" + the end-of-turn token (the tokenizer's EOS). With `dataset.answer_field` (PubMedQA's long_answer) the
answer is free text, "<label>. <answer text>", and the label alone is what label-likelihood scoring compares.
The loss covers the answer tokens only (dplora/data.py's `encode`).
"""

from __future__ import annotations

from omegaconf import DictConfig

USER_SLOT = "\x00USER\x00"  # stands for the user text while the chat template is rendered


class PromptError(ValueError):
    """The model cannot render the configured prompt (e.g. chat_template=true without a template)."""


def frame(tokenizer, cfg: DictConfig) -> tuple[list[int], list[int]]:
    """(tokens before the user text, tokens after it): [BOS] and [] for plain prompts; for chat prompts the
    template's system turn and user-turn opening, and the user-turn close plus the assistant-turn opening."""
    if not cfg.model.get("chat_template", False):
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), []
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"model.chat_template=true, but the tokenizer of {cfg.model.name} has no chat template; "
                          "set model.chat_template=false")
    messages = [{"role": "user", "content": USER_SLOT}]
    if cfg.dataset.get("instruction"):
        messages.insert(0, {"role": "system", "content": cfg.dataset.instruction})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if text.count(USER_SLOT) != 1:
        raise PromptError(f"the chat template of {cfg.model.name} does not render the user turn verbatim")
    head, tail = text.split(USER_SLOT)
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def prompt_ids(row: dict, tokenizer, cfg: DictConfig, framing: tuple[list[int], list[int]], budget: int) -> list[int]:
    """The prompt's tokens, at most `budget` of them: the user text is cut at its end to fit, the frame never."""
    head, tail = framing
    user = tokenizer(cfg.dataset.prompt.format(**{f: row[f] for f in cfg.dataset.text_fields}),
                     add_special_tokens=False)["input_ids"]
    return head + user[: max(budget - len(head) - len(tail), 0)] + tail


def label_text(cfg: DictConfig, label: int) -> str:
    name = cfg.dataset.label_names[label]
    return name if cfg.model.get("chat_template", False) else " " + name


def answer_ids(tokenizer, cfg: DictConfig, label: int, row: dict | None = None, *, scoring: bool = False,
               limit: int | None = None) -> list[int]:
    """The answer's tokens. `scoring`: the label alone (free-text datasets) as label-likelihood compares it;
    else the whole answer and EOS. `limit` caps a free-text answer (EOS kept)."""
    field = cfg.dataset.get("answer_field")
    text = label_text(cfg, label)
    if field and scoring:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if field and row is not None:
        text = f"{text}. {row[field]}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if limit is not None:
        ids = ids[: max(limit - 1, 1)]
    return ids + [tokenizer.eos_token_id]


def reference_text(cfg: DictConfig, row: dict) -> str:
    """The answer a free-text dataset's row expects, as text (ROUGE-L's reference)."""
    return f"{cfg.dataset.label_names[row['label']]}. {row[cfg.dataset.answer_field]}"
