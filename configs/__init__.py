"""storyfarm.configs: packaged YAML (model presets, example stories, daemon defaults)."""
