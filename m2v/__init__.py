"""storyfarm.m2v: the model runtime (StoryMem memory-to-video on the Wan2.2 architecture).

Read it in the order a shot flows (DESIGN.md section 3):
- model: the networks and their loading (transformer with the story RoPE, frame timesteps,
  conditioning, text encoder, VAE, weights in both key layouts, LoRA, the tiny random preset);
- render: the engine (one loaded model set), the story driver (the shot loop), shot modes,
  the flow-matching sampler, FIFO long shots, Consistent Self-Attention;
- memory: the story's memory bank and window, keyframe selection, the on-device latent pool;
- accel: kernel runtime choices, expert placement, compile, FP8, warm-up, ONNX/TensorRT export;
- video: mp4, PNG and reference-image IO.

The story format itself is torch-free and lives in `storyfarm.story`, below this package.
"""
