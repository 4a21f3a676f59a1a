"""Where the video and audio tokens sit in a request's joint latent row, and their packings.

Video latents (B, C, F', H', W') are packed as diffusers does with patch 1: (B, F' H' W', C) tokens; audio
latents (B, C_a, T, M) as (B, T, C_a M). A row is ``[video tokens..., audio tokens...]`` flattened.
"""
from __future__ import annotations

import attrs
import torch


@attrs.frozen
class Layout:
    frames: int  # latent frames
    height: int  # latent height
    width: int
    channels: int  # video latent channels
    audio_frames: int  # latent audio frames (25 per second in LTX-2)
    audio_channels: int
    mel_bins: int  # latent mel bins

    @classmethod
    def of(cls, req, components: dict, config) -> "Layout":
        audio_vae = components["audio_vae"]
        s, k = config.vae_scale_factor, config.vae_temporal_factor
        per_second = audio_vae.sample_rate / audio_vae.mel_hop_length / audio_vae.temporal_compression_ratio
        return cls(frames=(req.num_frames - 1) // k + 1, height=req.height // s, width=req.width // s,
                   channels=components["transformer"].config["in_channels"],
                   audio_frames=round(req.num_frames / req.params.frame_rate * per_second),
                   audio_channels=audio_vae.latent_channels,
                   mel_bins=audio_vae.mel_bins // audio_vae.mel_compression_ratio)

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def video_size(self) -> int:
        return self.video_tokens * self.channels

    def split(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint rows (B, L) -> video tokens (B, N, C) and audio tokens (B, T, C_a M)."""
        b = latents.shape[0]
        return (latents[:, :self.video_size].reshape(b, self.video_tokens, self.channels),
                latents[:, self.video_size:].reshape(b, self.audio_frames, -1))

    @staticmethod
    def join(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)

    def pack_video(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.permute(0, 2, 3, 4, 1).flatten(1, 3)

    def video(self, latents: torch.Tensor) -> torch.Tensor:
        """Joint rows -> video latents (B, C, F', H', W')."""
        tokens = self.split(latents)[0]
        return tokens.reshape(-1, self.frames, self.height, self.width, self.channels).permute(0, 4, 1, 2, 3)

    @staticmethod
    def pack_audio(latents: torch.Tensor) -> torch.Tensor:
        return latents.transpose(1, 2).flatten(2, 3)

    def audio_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        return self.split(latents)[1]

    def unpack_audio(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C_a M) -> (B, C_a, T, M)."""
        return tokens.unflatten(2, (-1, self.mel_bins)).transpose(1, 2)
