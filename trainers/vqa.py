"""What training does differently for a vqa run (image + question -> answer), kept out of
the loop: a split there has several questions per image (`Split.image_index`), so a model
whose image features do not depend on the question embeds each image once."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .split import Split


def image_rows(model, split: Split, batch_size: int, device: str) -> torch.Tensor:
    """Pooled image features of each distinct image of a vqa split [images, Di]."""
    return torch.cat([model.image_features(split.inputs[i:i + batch_size].to(device))
                      for i in range(0, len(split.inputs), batch_size)])


def logits_per_image(model, split: Split, batch_size: int,
                     device: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) batch by batch for a vqa model whose image features do not depend on
    the question: each image goes through the image tower once, whatever the number of
    questions asked of it (the same logits as the forward on every question)."""
    image = image_rows(model, split, batch_size, device)
    for start in range(0, len(split), batch_size):
        ids = torch.arange(start, min(start + batch_size, len(split)))
        batch = split.batch(ids)
        question = model.encode_question(batch.input_ids.to(device),
                                         batch.attention_mask.to(device))[0]
        yield model.answer(image[split.image_index[ids].to(device)], question)[0], batch.labels


@torch.no_grad()
def build_bank(model, split: Split, batch_size: int, device: str, seed: int) -> None:
    """GA-Net's bank from a vqa training split: each question's [image ; question] node."""
    image = image_rows(model, split, batch_size, device)[split.image_index.to(device)]
    question = torch.cat([model.encode_question(batch.input_ids.to(device),
                                                batch.attention_mask.to(device))[0]
                          for batch in split.batches(batch_size)])
    model.build_vqa_bank(image, question, split.labels, seed)
