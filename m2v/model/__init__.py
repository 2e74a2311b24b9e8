"""The M2V networks and their loading: transformer, RoPE, timesteps, conditioning, text, VAE, weights, LoRA."""
