"""The CLIP image encoder IP-Adapter's projection model reads (`image_embeds`).

Real weights come from a local folder (a diffusers IP-Adapter `image_encoder/`); the random
constructor builds a small CLIP vision tower with the same code path for tests and the demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pidrt.errors import FormatError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipImageEncoder:
    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)
        self.size = model.config.vision_config.image_size if hasattr(model.config, "vision_config") else model.config.image_size

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @classmethod
    def random(cls, embed_dim: int = 64, seed: int = 0) -> "ClipImageEncoder":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(seed)
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=16, projection_dim=embed_dim)
        return cls(CLIPVisionModelWithProjection(cfg))

    @classmethod
    def load(cls, folder: Path) -> "ClipImageEncoder":
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FormatError(f"{folder / 'config.json'}: missing; an image encoder folder is a transformers CLIPVisionModelWithProjection")
        return cls(CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True))

    @torch.no_grad()
    def embed(self, img: np.ndarray) -> torch.Tensor:
        """RGB uint8 [H, W, 3] -> image_embeds [D]: shortest side resized, centre crop, CLIP normalisation."""
        from PIL import Image

        pil = Image.fromarray(img)
        scale = self.size / min(pil.size)
        pil = pil.resize((max(self.size, round(pil.width * scale)), max(self.size, round(pil.height * scale))),
                         Image.Resampling.BICUBIC)
        left, top = (pil.width - self.size) // 2, (pil.height - self.size) // 2
        pil = pil.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        p = next(self.model.parameters())
        return self.model(pixel_values=x[None].to(p.device, p.dtype)).image_embeds[0]
