"""The vision encoder on its device, free of Triton: a request's uint8 units -> its image embeddings.

A unit is a tile [3, S, S] as preprocess sent it, a variable-size tile with its `tgt_sizes` row (MiniCPM-V), or a
decoded image [3, Hmax, Wmax] with its `image_grids` row, which the family cuts into tiles here, on the device,
with the bytes preprocess would have made (`ModelFamily.tiles_from_images`). Tiles are normalised on the device with
the family's lookup table and go through the encoder in forwards of at most `max_tiles`.

Used by the `vision_encoder` stage (Triton batches requests for it) and, with `engine.vision_in_llm`, by the llm
stage itself (`multimodal/inline_vision.py`), so both encode the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class VisionRunner:
    def __init__(self, family: Any, dtype: torch.dtype, device: torch.device, *, out_dtype: torch.dtype,
                 max_tiles: int, encoder: Any = None) -> None:
        """`encoder`: a stand-in for the family's encoder (tests); default `family.build_vision_encoder`."""
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        self.family, self.device, self.out_dtype, self.max_tiles = family, device, out_dtype, max_tiles
        self.encoder = family.build_vision_encoder(dtype, device) if encoder is None else encoder
        # the table in the encoder dtype: casting each entry once equals casting every normalised float32 pixel
        self.lut = torch.from_numpy(family.pixel_lut()).to(device, dtype)

    def tiles(self, pixels: torch.Tensor, grids: torch.Tensor | None = None) -> torch.Tensor:
        """A request's uint8 tiles: `pixels` as sent (wherever they are), or cut on the device from its decoded
        images when it has `image_grids`."""
        if grids is None:
            return pixels
        return self.family.tiles_from_images(pixels.to(self.device, non_blocking=True), grids)

    def encode(self, tiles: Sequence[torch.Tensor], tgt_sizes: Sequence[torch.Tensor | None] = ()
               ) -> tuple[torch.Tensor, list[int]]:
        """Several requests' tiles (and, for variable-size tiles, each one's tgt_sizes) through the encoder together
        -> (embeddings [sum N, T, H] in out_dtype on the device, tiles per request). Requests whose tiles differ in
        shape (variable-size tiles are padded per request) go through in separate runs, in order."""
        sizes = [int(t.shape[0]) for t in tiles]
        grids = list(tgt_sizes) or [None] * len(tiles)
        if len(grids) != len(tiles):
            raise ValueError(f"{len(grids)} tgt_sizes for {len(tiles)} requests")
        runs: list[list[int]] = []
        for k, t in enumerate(tiles):
            if runs and tiles[runs[-1][0]].shape[1:] == t.shape[1:]:
                runs[-1].append(k)
            else:
                runs.append([k])
        embeds = [self._encode_run([tiles[k] for k in run], [grids[k] for k in run]) for run in runs]
        return (embeds[0] if len(embeds) == 1 else torch.cat(embeds)), sizes

    def _encode_run(self, tiles: list[torch.Tensor], tgt_sizes: list[torch.Tensor | None]) -> torch.Tensor:
        if all(t.device.type == "cpu" for t in tiles):  # one copy to the device
            raw = torch.cat(tiles).to(self.device, non_blocking=True)
        else:
            raw = torch.cat([t.to(self.device, non_blocking=True) for t in tiles])
        given = [g for g in tgt_sizes if g is not None]
        if given and len(given) != len(tiles):
            raise ValueError("tgt_sizes must be given for every request of a batch or for none")
        extra = [torch.cat([g.reshape(-1, 2) for g in given])] if given else []  # stays where it was sent
        return torch.cat([
            self.encoder(self.family.normalize_pixels(part, self.lut, *part_extra), *part_extra)
            for part, *part_extra in zip(torch.split(raw, self.max_tiles),
                                         *(torch.split(e, self.max_tiles) for e in extra))
        ]).to(self.out_dtype)
