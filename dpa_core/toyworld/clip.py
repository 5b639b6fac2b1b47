"""The vision tower: a tiny CLIPModel trained contrastively (both towers from scratch) on training
images and a compact text of their content. The pipeline uses only its vision tower, frozen."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from .chat import END_OF_TEXT
from .sizes import WorldSize


def make_processor(image_size: int) -> CLIPImageProcessorPil:
    # Images are drawn at exactly this size, so resize and centre crop are identities; they are
    # kept on (the CLIP convention) so that any other image gets the same treatment.
    # Saved as "CLIPImageProcessor", so AutoImageProcessor loads it with or without torchvision.
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
    )


def make_clip(ws: WorldSize, tok: PreTrainedTokenizerFast) -> CLIPModel:
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    tower = dict(hidden_size=ws.clip_hidden, intermediate_size=ws.clip_intermediate,
                 num_hidden_layers=ws.clip_layers, num_attention_heads=ws.clip_heads)
    config = CLIPConfig(
        # The text tower pools at the first <|endoftext|> (appended to every text), which also pads.
        text_config=dict(vocab_size=len(tok), max_position_embeddings=ws.clip_text_max_len,
                         eos_token_id=eot, pad_token_id=eot, bos_token_id=eot, **tower),
        vision_config=dict(image_size=ws.image_size, patch_size=ws.clip_patch, num_channels=3, **tower),
        projection_dim=ws.clip_projection,
    )
    return CLIPModel(config)


def encode_texts(tok: PreTrainedTokenizerFast, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    ids = [t[: max_len - 1] + [eot] for t in tok(texts, add_special_tokens=False)["input_ids"]]
    width = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), width), eot, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return input_ids, mask


def pixel_values(processor: CLIPImageProcessorPil, images: list[Image.Image]) -> torch.Tensor:
    return processor(images=images, return_tensors="pt")["pixel_values"]


def train_clip(model: CLIPModel, pixels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
               ws: WorldSize, seed: int, negative_ids: torch.Tensor | None = None,
               negative_mask: torch.Tensor | None = None) -> dict:
    """Symmetric InfoNCE on random batches; cosine lr with warmup.

    negative_ids: for each image a hard-negative text (the same scene with one object's shape
    changed, as NegCLIP does). Colour and position alone tell a scene from the others in a batch,
    so without them the tower learns little about shape (linear probe on its patch features:
    shape 0.57 vs colour 0.99 per cell); with them each image must also beat its own near-miss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=ws.clip_lr, weight_decay=0.1)
    warmup = max(1, ws.clip_steps // 20)  # (step + 1) / warmup, as llm.lr_at (see there: not transformers')
    batch = min(ws.clip_batch, len(pixels))
    model.train()
    losses = []
    for step in range(ws.clip_steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, ws.clip_steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = ws.clip_lr * scale
        idx = torch.randperm(len(pixels), generator=gen)[:batch]
        if negative_ids is None:
            loss = model(input_ids=input_ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True).loss
        else:
            loss = _loss_with_hard_negatives(model, pixels[idx], torch.cat([input_ids[idx], negative_ids[idx]]),
                                             torch.cat([mask[idx], negative_mask[idx]]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first_loss": losses[0], "final_loss": sum(tail) / len(tail)}


def _loss_with_hard_negatives(model: CLIPModel, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image-to-text over the batch's texts plus their hard negatives; text-to-image as usual."""
    n = len(pixels)
    image = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    text = F.normalize(_features(model.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
    logits = model.logit_scale.exp() * image @ text.T  # (n, 2n)
    target = torch.arange(n)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n].T, target))


def _features(out) -> torch.Tensor:
    # get_*_features returns a tensor in some transformers versions and an output object in others.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, pixels: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, group: int = 32) -> float:
    """Image-to-text top-1 accuracy within groups of `group` held-out pairs (chance: 1/group)."""
    hits = total = 0
    for s in range(0, len(pixels), group):
        out = model(input_ids=input_ids[s : s + group], attention_mask=mask[s : s + group], pixel_values=pixels[s : s + group])
        hits += (out.logits_per_image.argmax(dim=1) == torch.arange(len(out.logits_per_image))).sum().item()
        total += len(out.logits_per_image)
    return hits / max(1, total)
