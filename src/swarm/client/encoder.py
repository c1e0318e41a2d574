"""An encoder-only model (BERT, RoBERTa, ViT, DINOv2, ...) whose layers run in the swarm while the rest runs here.

It is the model's own class (`BertModel`, `ViTModel`, or the class with a head that the checkpoint names, see
`swarm.client.base`): `model(input_ids, attention_mask=...)` or `model(pixel_values)` returns what the local
model returns, its embeddings, final norm and pooler computed here; the layers run as one forward pass through
the swarm's servers, with no session. `pipeline("feature-extraction", model=...)` and
`pipeline("image-feature-extraction", model=...)` take it as they take the local model.
"""

from __future__ import annotations

from swarm.client.base import SwarmModelMixin


class DistributedEncoderModel(SwarmModelMixin):
    """Mixed in front of an encoder's own class: its forward, with its layers in the swarm."""
