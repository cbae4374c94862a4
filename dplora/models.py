"""Base model + LoRA adapter for each task type, and the adapter <-> ArrayRecord conversion.

Only the adapter (LoRA matrices, plus the classification head for classification) is trainable, and only
it crosses the wire: `adapter_state` returns exactly the trainable tensors, as fp32. With FFA-LoRA
(`model.lora.train_a: false`) the A matrices stay at their seeded random initialization, identical on every
party, and only B (+ head) trains and travels.
"""

from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as hf_logging

from .protocol import check_arrays, layout_of

hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected: the head trains
hf_logging.disable_progress_bar()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tokenizer(model_cfg: DictConfig):
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.pretrained)
    # Causal LMs need a pad, a begin and an end token; BERT-style vocabularies name them differently.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    return tokenizer


def build_base_model(cfg: DictConfig, tokenizer) -> torch.nn.Module:
    """The frozen base model, identical on the server and every client (random weights seeded by cfg.seed)."""
    model_cfg, num_labels = cfg.model, len(cfg.dataset.label_names)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        if model_cfg.task == "classification" and model_cfg.pooling == "mean":
            model = MeanPoolingClassifier(AutoModel.from_pretrained(model_cfg.pretrained, dtype=torch.float32),
                                          num_labels)
            if model_cfg.head_init == "descriptions":
                model.init_head(tokenizer, label_descriptions(cfg.dataset), model_cfg.max_length)
        elif model_cfg.task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                model_cfg.pretrained, num_labels=num_labels, dtype=torch.float32)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        elif model_cfg.pretrained is None:  # random weights, from a config built in code (no download)
            arch = OmegaConf.to_container(model_cfg.architecture)
            model_type = arch.pop("model_type", "llama")  # llama (SmolLM2, Llama 3.2), qwen2 (Qwen2.5), gpt2
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
                model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **arch))
        else:
            model = AutoModelForCausalLM.from_pretrained(model_cfg.pretrained, dtype=torch.float32)
    return model


class MeanPoolingClassifier(torch.nn.Module):
    """A pretrained encoder, mean-pooled over the real tokens, and a linear head.

    Sentence-transformers trains MiniLM with mean pooling, so its pooled embedding is a far better starting
    point than the [CLS] token that AutoModelForSequenceClassification feeds to its head (model.pooling=cls).
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mean of the encoder's last hidden states over the real tokens."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.classifier(self.pool(input_ids, attention_mask)))

    @torch.no_grad()
    def init_head(self, tokenizer, descriptions: list[str], max_length: int) -> None:
        """Start the head where the pretrained encoder already is (`model.head_init=descriptions`): row k is
        the unit embedding of label k's description, scaled by HEAD_TEMPERATURE / the descriptions' mean
        embedding norm, and the bias is 0. Logit k is then proportional to the cosine between an input's
        embedding and description k's, so before any training the model predicts the nearest description.
        Computed from public text only (the dataset's config): it costs no privacy."""
        was_training = self.training
        self.eval()
        enc = tokenizer(list(descriptions), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(self.classifier.weight.device)
        embeddings = self.pool(enc["input_ids"], enc["attention_mask"]).float()
        norms = embeddings.norm(dim=1, keepdim=True)
        self.classifier.weight.copy_(HEAD_TEMPERATURE * embeddings / norms / norms.mean())
        self.classifier.bias.zero_()
        self.train(was_training)


HEAD_TEMPERATURE = 20.0  # logits = 20 x cosine (roughly): confident but not saturated, as sentence-transformers scales


def label_descriptions(dataset_cfg: DictConfig) -> list[str]:
    """`dataset.label_descriptions`, or the label names where it is null."""
    descriptions = dataset_cfg.get("label_descriptions")
    return list(descriptions) if descriptions is not None else list(dataset_cfg.label_names)


def lora_config(cfg: DictConfig, num_layers: int | None = None) -> LoraConfig:
    """peft's LoraConfig. `model.lora.layers=k` puts LoRA on the top k of the base model's `num_layers`
    transformer layers only: the backward pass then stops at the lowest of them."""
    lora, task = cfg.model.lora, cfg.model.task
    layers = None
    if lora.get("layers") is not None:
        if num_layers is None or lora.layers > num_layers:
            raise ValueError(f"model.lora.layers={lora.layers}: {cfg.model.name} has {num_layers} layers")
        layers = list(range(num_layers - lora.layers, num_layers))
    if task == "classification" and cfg.model.pooling == "mean":  # a plain module: name the head ourselves
        task_type, modules_to_save = None, ["classifier"]
    else:  # peft's task types know their heads (classifier / score) and freeze the LM head
        task_type, modules_to_save = (TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM), None
    return LoraConfig(task_type=task_type, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), modules_to_save=modules_to_save, bias="none",
                      fan_in_fan_out=bool(lora.get("fan_in_fan_out", False)),  # GPT-2's Conv1D stores W transposed
                      layers_to_transform=layers)


def build_model(cfg: DictConfig, device: str | torch.device = "cpu"):
    """(peft model with a fresh LoRA adapter, tokenizer). The model is on `device`, in train mode."""
    tokenizer = build_tokenizer(cfg.model)
    base = build_base_model(cfg, tokenizer).to(device)  # to its device before get_peft_model
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the server's initial adapter (and FFA-LoRA's fixed A) is reproducible
        model = get_peft_model(base, lora_config(cfg, getattr(base.config, "num_hidden_layers", None)))
    if not cfg.model.lora.train_a:  # FFA-LoRA: A stays at its random initialization; B (+ head) trains
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    model.train()
    return model, tokenizer


# ------------------------------------------------------------------------------- adapter <-> ArrayRecord

def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors (LoRA + head; B + head only with FFA-LoRA), fp32 on CPU, keyed as peft
    saves them."""
    trainable = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    state = get_peft_model_state_dict(model)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items() if v.data_ptr() in trainable}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into `model` after checking them against the model's own adapter."""
    check_arrays(state, layout_of(adapter_state(model)), "the model's adapter")
    set_peft_model_state_dict(model, state)


def to_arrays(model: PeftModel) -> ArrayRecord:
    return ArrayRecord(adapter_state(model))


def from_arrays(model: PeftModel, arrays: ArrayRecord) -> None:
    load_adapter_state(model, arrays.to_torch_state_dict())


def num_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
