"""storyfarm.story: what every layer needs to know about a story, without torch.

The bottom of the import graph: the daemon's parent process, the scheduler's policy and the model
runtime all import it, and it imports none of them, nor torch, numpy or av (PIL only inside the
one function that decodes a reference image). What lives here:

- format: a story file (StoryMem's JSON, read in storymem, or the native YAML/JSON) -> Story /
  ShotSpec (spec), and the checks against what a model can render (fields, checks: field paths in
  every error);
- modes: render options of a shot or story (one pass, FIFO, CSA, edits);
- presets and config: model presets and the strict YAML helpers the daemon config uses too;
- lifecycle: the states of stories and shots, attempt outcomes and the render stages in order;
- numbering: shot numbers (from 1, for people) against shot indices (from 0, on the wire), and
  keyframe ids;
- kernel_choices: the names of the runtime's kernel choices a preset may use;
- files: atomic writes and hashing; references: reference-image checks.
"""
