"""A story's memory: the keyframe bank and window, keyframe selection, the on-device latent pool."""
